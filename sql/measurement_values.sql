-- Measurements holding a numeric value. Tables: {measurement}.
SELECT count(value_as_number) FROM {measurement}
