"""Tests of playbooks.config: precedence, every error path, and the commented default file."""

from __future__ import annotations

import pickle
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

from playbooks.config import (
    CONFIG_FILENAME,
    Config,
    ConfigError,
    ConfigWarning,
    DurabilityConfig,
    ModelConfig,
    SandboxConfig,
    env_var_name,
    load_config,
    write_default_config,
)
from playbooks.errors import PlaybooksError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str, **kwargs: Any) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=kwargs.pop("env", {}), **kwargs)
    return info.value


# --- defaults and discovery ------------------------------------------------------------------------


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config == Config()
    assert config.source is None
    assert config.durability == DurabilityConfig(
        enabled=True,
        storage_path=".checkpoints",
        max_checkpoint_size_mb=100.0,
        keep_last_n=10,
        provider="filesystem",
        unpicklable="skip",
        hmac_key_env="PLAYBOOKS_CHECKPOINT_KEY",
        delete_completed_after_days=None,
    )
    assert config.model == ModelConfig(
        provider="replay",
        name="gpt-4o-mini",
        base_url=None,
        api_key_env="OPENAI_API_KEY",
        cassette=None,
        temperature=0.0,
    )


def test_file_in_current_directory_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "[durability]\nkeep_last_n = 3\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.durability.keep_last_n == 3
    assert config.source == tmp_path / CONFIG_FILENAME


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, env={})
    assert info.value.file == str(missing)
    assert str(info.value).startswith(str(missing))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})


def test_file_values_are_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[durability]
enabled = false
storage_path = "/var/ckpt"
max_checkpoint_size_mb = 5          # an integer is fine for a float key
keep_last_n = 2
provider = "sqlite"
unpicklable = "strict"
hmac_key_env = "MY_KEY"

[model]
provider = "openai"
name = "llama3"
base_url = "http://localhost:8000/v1"
api_key_env = "LOCAL_KEY"
cassette = "c.json"
temperature = 0.7
""",
    )
    config = load_config(path, env={})
    assert config.durability == DurabilityConfig(False, "/var/ckpt", 5.0, 2, "sqlite", "strict", "MY_KEY")
    assert isinstance(config.durability.max_checkpoint_size_mb, float)
    assert config.model == ModelConfig(
        "openai", "llama3", "http://localhost:8000/v1", "LOCAL_KEY", "c.json", 0.7
    )
    assert config.source == path


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[model]\nname = "x"\n'), env={})
    assert config.model.name == "x"
    assert config.model.provider == "replay"
    assert config.durability == DurabilityConfig()


def test_top_level_dotted_keys(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "durability.keep_last_n = 4\n"), env={})
    assert config.durability.keep_last_n == 4


# --- precedence ------------------------------------------------------------------------------------


def test_precedence_overrides_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, '[durability]\nkeep_last_n = 3\nstorage_path = "from-file"\nenabled = false\n')
    env = {"PLAYBOOKS_DURABILITY_KEEP_LAST_N": "5", "PLAYBOOKS_DURABILITY_STORAGE_PATH": "from-env"}
    config = load_config(path, env=env, overrides={"durability.keep_last_n": 7})
    assert config.durability.keep_last_n == 7  # override beats env and file
    assert config.durability.storage_path == "from-env"  # env beats file
    assert config.durability.enabled is False  # file beats default
    assert config.durability.max_checkpoint_size_mb == 100.0  # default


def test_env_alone_beats_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        "PLAYBOOKS_DURABILITY_ENABLED": "no",
        "PLAYBOOKS_DURABILITY_MAX_CHECKPOINT_SIZE_MB": "2.5",
        "PLAYBOOKS_DURABILITY_UNPICKLABLE": "strict",
        "PLAYBOOKS_MODEL_PROVIDER": "openai",
        "PLAYBOOKS_MODEL_NAME": "gpt-x",
        "PLAYBOOKS_MODEL_BASE_URL": "http://h/v1",
        "PLAYBOOKS_MODEL_TEMPERATURE": "0.5",
    }
    config = load_config(env=env)
    assert config.durability.enabled is False
    assert config.durability.max_checkpoint_size_mb == 2.5
    assert config.durability.unpicklable == "strict"
    assert config.model == ModelConfig("openai", "gpt-x", "http://h/v1", "OPENAI_API_KEY", None, 0.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        (" Off ", False),
    ],
)
def test_env_booleans(raw: str, expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={"PLAYBOOKS_DURABILITY_ENABLED": raw}).durability.enabled is expected


def test_empty_env_unsets_optional_string(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nbase_url = "http://file/v1"\n')
    assert load_config(path, env={"PLAYBOOKS_MODEL_BASE_URL": ""}).model.base_url is None


def test_os_environ_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLAYBOOKS_MODEL_NAME", "from-os-environ")
    assert load_config().model.name == "from-os-environ"


def test_env_var_name_scheme() -> None:
    name = env_var_name("durability", "max_checkpoint_size_mb")
    assert name == "PLAYBOOKS_DURABILITY_MAX_CHECKPOINT_SIZE_MB"
    assert env_var_name("model", "base_url") == "PLAYBOOKS_MODEL_BASE_URL"


def test_overrides_accept_text_and_typed_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(
        env={},
        overrides={
            "durability.enabled": "false",
            "durability.keep_last_n": "4",
            "model.temperature": 1,
            "model.cassette": "x.json",
            "model.base_url": None,
        },
    )
    assert config.durability.enabled is False
    assert config.durability.keep_last_n == 4
    assert config.model.temperature == 1.0
    assert config.model.cassette == "x.json"
    assert config.model.base_url is None


# --- errors: file ---------------------------------------------------------------------------------


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    error = _error(tmp_path, "[durability]\nenabled = \nkeep_last_n = 1\n")
    assert (error.line, error.column) == (2, 11)
    assert "invalid TOML" in str(error)
    assert str(error).startswith(f"{tmp_path / CONFIG_FILENAME}:2:11: ")
    assert "(at line" not in str(error)


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    error = _error(tmp_path, '[model]\nname = "unterminated')
    assert "invalid TOML" in str(error)
    assert error.line is not None


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_bytes(b'[model]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8") as info:
        load_config(path, env={})
    assert info.value.line == 2


def test_unknown_table_suggests_closest(tmp_path: Path) -> None:
    error = _error(tmp_path, "[durabilty]\nenabled = true\n")
    assert "unknown table [durabilty]" in str(error)
    assert "did you mean 'durability'" in str(error)
    assert error.key == "durabilty"
    assert error.line == 1


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    error = _error(tmp_path, "[durability]\nenabled = true\nkeep_last = 3\n")
    message = str(error)
    assert "unknown key 'keep_last' in table [durability]" in message
    assert "did you mean 'keep_last_n'" in message
    assert "storage_path" in message  # lists what is allowed
    assert error.key == "durability.keep_last"
    assert (error.line, error.column) == (3, 1)
    assert message.startswith(f"{tmp_path / CONFIG_FILENAME}:3:1: ")


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    error = _error(tmp_path, "[model]\nzzz = 1\n")
    assert "unknown key 'zzz'" in str(error)
    assert "did you mean" not in str(error)


def test_top_level_key_that_belongs_in_a_table(tmp_path: Path) -> None:
    error = _error(tmp_path, "keep_last_n = 3\n")
    assert "unknown top-level key 'keep_last_n'" in str(error)
    assert "did you mean 'durability.keep_last_n'" in str(error)
    assert error.line == 1


def test_table_name_with_scalar_value(tmp_path: Path) -> None:
    error = _error(tmp_path, "durability = 5\n")
    assert "durability: expected a table" in str(error)


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        (
            '[durability]\nenabled = "yes"\n',
            "durability.enabled",
            "a boolean (true or false)",
            "string 'yes'",
        ),
        ("[durability]\nkeep_last_n = 2.5\n", "durability.keep_last_n", "an integer >= 1", "float 2.5"),
        ("[durability]\nkeep_last_n = true\n", "durability.keep_last_n", "an integer >= 1", "boolean True"),
        ("[durability]\nstorage_path = 3\n", "durability.storage_path", "a non-empty string", "integer 3"),
        (
            '[durability]\nmax_checkpoint_size_mb = "big"\n',
            "durability.max_checkpoint_size_mb",
            "a number > 0",
            "string 'big'",
        ),
        ('[durability]\nunpicklable = "ignore"\n', "durability.unpicklable", "one of 'skip', 'strict'", ""),
        ("[model]\nbase_url = [1]\n", "model.base_url", "a non-empty string", "array [1]"),
        ('[model]\ntemperature = "hot"\n', "model.temperature", "a number >= 0", ""),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, key: str, expected: str, got: str) -> None:
    error = _error(tmp_path, text)
    assert error.key == key
    assert error.expected == expected
    assert f"{key}: expected {expected}, got {got}" in str(error)
    assert error.line == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[durability]\nkeep_last_n = -1\n", "an integer >= 1"),
        ("[durability]\nkeep_last_n = 0\n", "an integer >= 1"),
        ("[durability]\nmax_checkpoint_size_mb = 0\n", "a number > 0"),
        ("[durability]\nmax_checkpoint_size_mb = -3.5\n", "a number > 0"),
        ("[durability]\nmax_checkpoint_size_mb = inf\n", "a finite number > 0"),
        ("[model]\ntemperature = -0.1\n", "a number >= 0"),
        ('[model]\nname = ""\n', "a non-empty string"),
    ],
)
def test_out_of_range_values(tmp_path: Path, text: str, expected: str) -> None:
    error = _error(tmp_path, text)
    assert f"expected {expected}" in str(error)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError, match="cannot read configuration file: Permission denied"):
        load_config(path, env={})


# --- errors: environment and overrides ------------------------------------------------------------


def test_bad_env_boolean(tmp_path: Path) -> None:
    error = _error(tmp_path, "", env={"PLAYBOOKS_DURABILITY_ENABLED": "maybe"})
    assert str(error) == (
        "environment variable PLAYBOOKS_DURABILITY_ENABLED='maybe': "
        "expected a boolean (true/false, 1/0, yes/no, on/off)"
    )
    assert error.key == "PLAYBOOKS_DURABILITY_ENABLED"
    assert error.file is None


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("PLAYBOOKS_DURABILITY_KEEP_LAST_N", "ten", "an integer >= 1"),
        ("PLAYBOOKS_DURABILITY_KEEP_LAST_N", "-2", "an integer >= 1"),
        ("PLAYBOOKS_DURABILITY_MAX_CHECKPOINT_SIZE_MB", "nan", "a finite number > 0"),
        ("PLAYBOOKS_DURABILITY_MAX_CHECKPOINT_SIZE_MB", "0", "a number > 0"),
        ("PLAYBOOKS_DURABILITY_UNPICKLABLE", "STRICT", "one of 'skip', 'strict'"),
        ("PLAYBOOKS_MODEL_NAME", " ", "a non-empty string"),
    ],
)
def test_bad_env_values(tmp_path: Path, name: str, raw: str, expected: str) -> None:
    error = _error(tmp_path, "", env={name: raw})
    assert str(error) == f"environment variable {name}={raw!r}: expected {expected}"


def test_env_error_wins_over_valid_file(tmp_path: Path) -> None:
    error = _error(tmp_path, "[durability]\nkeep_last_n = 3\n", env={"PLAYBOOKS_DURABILITY_KEEP_LAST_N": "x"})
    assert error.key == "PLAYBOOKS_DURABILITY_KEEP_LAST_N"


def test_unknown_env_variable_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(ConfigWarning, match="PLAYBOOKS_DURABILITY_ENABLE sets no configuration key.*ENABLED"):
        load_config(env={"PLAYBOOKS_DURABILITY_ENABLE": "true"})


def test_key_variables_named_by_config_do_not_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"PLAYBOOKS_MODEL_API_KEY_ENV": "PLAYBOOKS_MODEL_SECRET", "PLAYBOOKS_MODEL_SECRET": "s3cret"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(env=env)
    assert config.model.api_key_env == "PLAYBOOKS_MODEL_SECRET"


def test_unknown_override_key(tmp_path: Path) -> None:
    error = _error(tmp_path, "", overrides={"durability.keep_last": 3})
    assert "unknown configuration key 'durability.keep_last'" in str(error)
    assert "did you mean 'durability.keep_last_n'" in str(error)


def test_override_without_table(tmp_path: Path) -> None:
    error = _error(tmp_path, "", overrides={"enabled": True})
    assert "unknown configuration key 'enabled'" in str(error)


def test_bad_override_value(tmp_path: Path) -> None:
    error = _error(tmp_path, "", overrides={"durability.keep_last_n": -1})
    assert str(error) == "command-line override durability.keep_last_n=-1: expected an integer >= 1"
    error = _error(tmp_path, "", overrides={"durability.enabled": "maybe"})
    assert "expected a boolean" in str(error)


# --- the dataclasses -------------------------------------------------------------------------------


def test_dataclasses_validate_on_construction() -> None:
    expected = r"DurabilityConfig.keep_last_n: expected an integer >= 1, got integer -1"
    with pytest.raises(ConfigError, match=expected):
        DurabilityConfig(keep_last_n=-1)
    with pytest.raises(ConfigError, match="ModelConfig.temperature"):
        ModelConfig(temperature=-1.0)


def test_dataclasses_are_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.durability.enabled = False  # type: ignore[misc]


def test_config_error_is_a_playbooks_error_and_pickles(tmp_path: Path) -> None:
    error = _error(tmp_path, "[durability]\nkeep_last = 3\n")
    assert isinstance(error, PlaybooksError)
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error)
    assert (clone.file, clone.key, clone.line) == (error.file, error.key, error.line)


def test_resolve_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), env={})
    assert config.resolve_path(config.durability.storage_path) == tmp_path / ".checkpoints"
    assert config.resolve_path("/abs/x") == Path("/abs/x")
    assert Config().resolve_path("rel") == Path("rel")


# --- the default file ------------------------------------------------------------------------------


def test_default_file_roundtrips_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    write_default_config(path)
    assert load_config(path, env={}) == Config(source=path)


def test_default_file_is_commented_and_names_env_vars(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    write_default_config(path)
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert set(data) == {"durability", "model", "sandbox"}
    assert "base_url" not in data["model"]  # None cannot be written: shown as a commented example
    assert '# base_url = "' in text
    assert "import_allow" not in data["sandbox"] and "# import_allow = [" in text
    for table, section in (("durability", DurabilityConfig()), ("model", ModelConfig()), ("sandbox", SandboxConfig())):
        for key in section.__dataclass_fields__:
            assert f"# Environment variable: {env_var_name(table, key)}\n" in text
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    for index, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[index - 1].startswith("#"), f"value without comment: {line!r}"


def test_default_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = _write(tmp_path, "[model]\nname = 'mine'\n")
    with pytest.raises(ConfigError, match="refusing to overwrite") as info:
        write_default_config(path)
    assert info.value.file == str(path)
    assert path.read_text(encoding="utf-8") == "[model]\nname = 'mine'\n"
    write_default_config(path, overwrite=True)
    assert load_config(path, env={}) == Config(source=path)


def test_default_file_unwritable_location(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write configuration file"):
        write_default_config(tmp_path / "missing-dir" / CONFIG_FILENAME)


def test_repository_playbooks_toml_is_the_default_file(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    write_default_config(path)
    repo_file = REPO_ROOT / CONFIG_FILENAME
    assert repo_file.read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    assert load_config(repo_file, env={}) == Config(source=repo_file)


def test_sandbox_lists_from_file_and_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, '[sandbox]\nimport_deny = ["socket", "ctypes"]\nstatement_timeout = 0\n')
    config = load_config(path, env={"PLAYBOOKS_SANDBOX_ENV": "TZ, LANGUAGE"})
    assert config.sandbox.import_deny == ("socket", "ctypes")
    assert config.sandbox.env == ("TZ", "LANGUAGE")
    from playbooks.execution.sandbox import SandboxLimits

    limits = SandboxLimits.from_config(config.sandbox)
    assert limits.statement_timeout is None and limits.import_deny == ("socket", "ctypes")
    assert limits.import_allow is None
    with pytest.raises(ConfigError, match="list of"):
        load_config(_write(tmp_path, "[sandbox]\nimport_deny = 'socket'\n"), env={})
    with pytest.raises(ConfigError, match="list of non-empty strings"):
        load_config(_write(tmp_path, "[sandbox]\nenv = ['A', 3]\n"), env={})


def test_durability_secret_env_from_file_and_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, '[durability]\nsecret_env = ["STRIPE_KEY"]\n')
    assert load_config(path, env={}).durability.secret_env == ("STRIPE_KEY",)
    config = load_config(path, env={"PLAYBOOKS_DURABILITY_SECRET_ENV": "A_KEY, B_KEY"})
    assert config.durability.secret_env == ("A_KEY", "B_KEY")
