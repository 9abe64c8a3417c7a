"""The service `dvm run` starts: `Worker` (worker.py) wires `Intake` (taking requests in),
`Checkout` (price and payment, with `Offer` and the cashier), `Runner` (running jobs) and the `Outbox` (what
is said, one `Reply` per request), with `Cancels`, the config, the plugins and systemd's notify
protocol. dvm_core/README.md follows one paid job through them. Never imports a plugin."""
