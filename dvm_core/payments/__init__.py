"""Money: the cashier (`cashier`: whose token pays which job, change, refunds and money owed,
each written to SQLite before it moves), the Cashu wallet (`wallet`, the one door to Nutshell),
per-job P2PK locks (`locks`) and the named crash points the fault suite kills the worker at
(`crashpoints`). Imports protocol, transport and state."""
