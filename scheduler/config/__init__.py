"""The config: pydantic-settings models for every table, TOML loading, validation, the
secret rule, and the checks a config's files and packages must pass."""
