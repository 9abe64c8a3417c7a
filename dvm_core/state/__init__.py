"""The worker's durable state: SQLite (`store`) and the job states with their allowed moves
(`jobstate`). Below payments and the worker, above nothing but the standard library."""
