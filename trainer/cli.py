"""What the command lines share: their flags, made from the config's fields, and their start-up.

Every field of `PrepareConfig` and `TrainConfig` is a flag of the same name (or the name its
metadata gives), with the help text, bounds and choices kept beside the field (`config._flag`).
The flags are defined when a command line starts (`run`), not when its module is imported, so
any program can import both command lines; `parse_config` reads a config from arguments into a
`FlagValues` of its own (tests, notebooks).

absl's `app.run` reports a bad flag value and exits 1, which Kubeflow's ExitCode policy (and any
scheduler that reads exit codes) cannot tell from a crash; our command lines exit 2 for every
bad flag, as for any other bad input (`trainer.errors`). Free of TensorFlow.
"""

import dataclasses
import os
import sys
import typing
from typing import Callable, List, Optional, Sequence, Type

from absl import app, flags

from trainer import errors
from trainer.errors import ConfigError


def flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get("flag") or field.name


def _value_type(config_class: type, field: dataclasses.Field):
  """A field's type without Optional: str, int, float, bool, or a Tuple[...]."""
  hint = typing.get_type_hints(config_class)[field.name]
  if typing.get_origin(hint) is typing.Union:
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  return hint


def define_flags(config_class: type, flag_values: flags.FlagValues,
                 module_name: Optional[str] = None) -> None:
  """Defines in `flag_values` one flag per field of `config_class` (with its default: the
  field's, or its environment variable's value when that is set)."""
  for field in dataclasses.fields(config_class):
    meta, name = field.metadata, flag_name(field)
    default = None if field.default is dataclasses.MISSING else field.default
    if meta.get("env"):
      default = os.environ.get(meta["env"], default)
    kind = _value_type(config_class, field)
    common = dict(flag_values=flag_values, module_name=module_name)
    bound = ({"lower_bound": meta["lower_bound"]} if meta.get("lower_bound") is not None
             else {})
    if meta.get("choices"):
      flags.DEFINE_enum(name, default, meta["choices"], meta["help"], **common)
    elif kind is bool:
      flags.DEFINE_bool(name, default, meta["help"], **common)
    elif kind is int:
      flags.DEFINE_integer(name, default, meta["help"], **bound, **common)
    elif kind is float:
      flags.DEFINE_float(name, default, meta["help"], **bound, **common)
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE_list(name, [str(v) for v in default], meta["help"], **common)
    else:
      flags.DEFINE_string(name, default, meta["help"], **common)
    if meta.get("required") and default is None:  # (an environment default satisfies it)
      flags.mark_flag_as_required(name, flag_values)


def config_from(config_class: type, flag_values: flags.FlagValues):
  """The validated config of parsed `flag_values`.

  Raises:
    ConfigError: naming the flag and the offending value.
  """
  values = {}
  for field in dataclasses.fields(config_class):
    name, value = flag_name(field), flag_values[flag_name(field)].value
    kind = _value_type(config_class, field)
    if typing.get_origin(kind) is tuple:
      item = typing.get_args(kind)[0]
      try:
        value = tuple(item(v) for v in value)
      except ValueError:
        raise ConfigError(f"--{name}={','.join(value)} must be "
                          f"{'integers' if item is int else item.__name__ + ' values'}, e.g. "
                          f"{','.join(map(str, field.default))}") from None
    if field.metadata.get("parse") and value is not None:
      value = field.metadata["parse"](value)
    values[field.name] = value
  return config_class(**values).validate()


def parse_config(config_class: type, argv: Sequence[str]):
  """The validated config of command-line arguments `argv` (argv[0]: the program), read into
  flags of their own (`--flagfile` included).

  Raises:
    flags.Error: a flag that does not parse; ConfigError: a config that does not validate.
  """
  flag_values = flags.FlagValues()
  define_flags(config_class, flag_values)
  flag_values(list(argv))
  return config_from(config_class, flag_values)


def run(main: Callable[[List[str]], None], program: str,
        config_class: Optional[Type] = None) -> None:
  """`app.run(main)` with the flags of `config_class`, if any (they show in --helpshort), a
  flag error printed as `<program>: error: ...` and exit code 2."""
  if config_class is not None:
    define_flags(config_class, flags.FLAGS, module_name=sys.argv[0])

  def parse(argv: List[str]) -> List[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{program}: error: {e}\nPass --helpshort or --helpfull to see help on flags.",
            file=sys.stderr)
      sys.exit(errors.USAGE_EXIT_CODE)

  app.run(main, flags_parser=parse)
