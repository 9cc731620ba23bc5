"""`lipnext serve`: certified predictions over HTTP, a Ray Serve deployment of `lipnext certify`'s code path.

  requests.py    decoding and validation of one request body (pure functions) and the answer's JSON
  deployment.py  the Ray Serve deployment: one `ShardCertifier` per replica, dynamic batching
  describe.py    what `GET /model` says: the model, its bound, and a certification report beside it
  cli.py         `lipnext serve CKPT`: verify on the driver, start Serve, wait for Ctrl-C
Nothing here is imported by the library; only the CLI wires it in.
"""
