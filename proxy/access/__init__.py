"""Who may ask what, and how much: tokens and scopes (auth), TLS, request limits,
admission control and the guards that hold them."""
