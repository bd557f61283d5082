"""HTTP routers, one module per resource family; ``coffer.api.app.create_app`` includes them."""
