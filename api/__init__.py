"""What the applications accept: the HTTP request schemas, their validation, and the app configs a Serve YAML binds.

Below `deployments/` (the Serve shells import it; it imports no deployment), above `engine/` and `models/`.
The application builders that wire deployments together stay in `serve_graph/`.
"""
