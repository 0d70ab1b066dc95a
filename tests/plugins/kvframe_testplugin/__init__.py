"""Third-party kvframe plugins used by the tests (one module per plugin)."""
