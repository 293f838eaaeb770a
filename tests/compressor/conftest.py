from tests.service.fixtures import model_root, tiny_model  # noqa: F401
