-- The names of some concepts. Binds: :ids (expanding). Tables: {concept}.
SELECT concept_id, concept_name FROM {concept} WHERE concept_id IN :ids
