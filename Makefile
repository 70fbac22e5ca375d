.PHONY: demo test lint bench
demo:  ## synthetic sites on DuckDB -> report (the main job, no server)
	bash scripts/demo.sh
test:  ## lint + pytest on DuckDB and a throwaway PostgreSQL
	bash scripts/test.sh
lint:
	.venv/bin/ruff check omopfl tests bench examples
bench:
	bash scripts/with-postgres.sh .venv/bin/python bench/synth_bench.py
