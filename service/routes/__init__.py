"""The API's routers, one module per resource; `service.app.create_app` mounts them."""

__all__ = ["adapters", "admin", "files", "health", "jobs", "models"]
