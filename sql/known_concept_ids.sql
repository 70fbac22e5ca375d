-- Which of some concept ids the vocabulary holds. Binds: :ids (expanding). Tables: {concept}.
SELECT concept_id FROM {concept} WHERE concept_id IN :ids
