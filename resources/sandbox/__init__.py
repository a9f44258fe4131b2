"""Provider sandbox: a stateful local Stripe + Polar API server for demo and tests.

* `resources.sandbox.app.create_app(clock=None)` -> Starlette app; its state is
  ``app.state.sandbox`` (`state.SandboxState`: ``now()``, ``set_clock_offset()``,
  ``advance_clock()``, ``set_now()``, ``configure_faults()``, ``reset()``).
* `resources.sandbox.server.serve(host, port)` -> blocking uvicorn server.
* `resources.sandbox.testing.running_sandbox(clock=None)` -> background server
  on 127.0.0.1 with ``.base_url``, ``.app``, ``.state``.

The real `stripe` and `polar-sdk` clients talk to it over HTTP; the /_sandbox
admin contract is described in `resources.sandbox.admin`.
"""
