"""One flag grammar for every command: argparse flags generated from a config dataclass.

A field ``batch_size: int = 32`` becomes ``--batch-size 32``; a tuple takes several values
(``--betas 0.9 0.95``); a bool takes an optional value (``--compile``, ``--tensorboard false``); a dict
field whose keys are the arguments of another callable (a model config, a filter function) takes dotted
keys (``--model.dropout 0``, ``--filters.min-size 512``), collected into the dict. Help comes from the
comment on the field's line in the dataclass source, so the dataclass stays the one place a setting is
described. Old spellings keep working: underscores in a flag's name (``--batch_size=32``) and a whole dict
as JSON (``--model '{"dropout": 0}'``).
"""
import argparse
import ast
import dataclasses
import inspect
import json
import re
import textwrap


def parse_bool(text):
    if text.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if text.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_json(text):
    """A JSON value where the text is one (null, 3, [1, 2]), the text itself otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def json_value(text):
    """A value given as JSON (argparse names it "invalid JSON value" when it is not)."""
    return json.loads(text)


json_value.__name__ = 'JSON'


def parse_dict(text):
    value = parse_json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dropout\": 0}}', got {text!r}")
    return value


def field_comments(cls):
    """{field name: the comment on its line and the comment-only lines below it} from the source of the
    class and of the dataclasses it extends."""
    comments = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(own_comments(base))
    return comments


def own_comments(cls):
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    comments = {}
    for node in ast.parse('\n'.join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            parts, i = [], node.end_lineno - 1
            while i < len(lines) and '#' in lines[i] and (i == node.end_lineno - 1 or lines[i].strip()[0] == '#'):
                parts.append(lines[i].split('#', 1)[1].strip())
                i += 1
            comments[node.target.id] = ' '.join(parts).replace('%', '%%')   # argparse formats help with %
    return comments


def value_type(default, annotation=''):
    """The parser of one value: the default's type (of its items for a sequence), else the first scalar
    type the annotation names; ``null`` / ``none`` mean None where the annotation allows None."""
    sample = default[0] if isinstance(default, (tuple, list)) and default else default
    named = [k for k in (bool, int, float, str) if re.search(rf'\b{k.__name__}\b', str(annotation))]
    kind = type(sample) if isinstance(sample, (bool, int, float, str)) else named[0] if named else json_value
    kind = parse_bool if kind is bool else kind
    if default is not None and 'None' not in str(annotation):
        return kind

    def optional(text):
        return None if text.lower() in ('null', 'none') else kind(text)
    optional.__name__ = getattr(kind, '__name__', 'value')      # argparse names it in "invalid ... value"
    return optional


class Values(argparse.Action):
    """Several values (``--betas 0.9 0.95``) or one JSON list (``--betas [0.9,0.95]``), parsed by ``kind``;
    ``count`` of them when a tuple has a fixed length; one value kept as a scalar where ``scalar``."""

    def __init__(self, *args, kind=str, count=None, scalar=False, sequence=tuple, **kwargs):
        super().__init__(*args, nargs='+', **kwargs)
        self.kind, self.count, self.scalar, self.sequence = kind, count, scalar, sequence

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and values[0].lstrip().startswith('['):
            try:
                values = [json.dumps(v) if not isinstance(v, str) else v for v in json.loads(values[0])]
            except json.JSONDecodeError:
                raise argparse.ArgumentError(self, f"not a JSON list: {values[0]!r}") from None
        try:
            parsed = [self.kind(v) for v in values]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentError(self, f"invalid {getattr(self.kind, '__name__', '')} value in "
                                               f"{' '.join(values)!r}") from None
        if self.count is not None and len(parsed) != self.count and not (self.scalar and len(parsed) == 1):
            raise argparse.ArgumentError(self, f"expected {self.count} values, got {len(parsed)}")
        setattr(namespace, self.dest, parsed[0] if self.scalar and len(parsed) == 1 else self.sequence(parsed))


def flag_options(default, help_='', annotation=''):
    """add_argument options for a value whose default is ``default`` (``annotation``: its declared type)."""
    kind = value_type(default, annotation)
    if isinstance(default, bool):
        return dict(type=kind, nargs='?', const=True, metavar='BOOL', help=help_)
    if isinstance(default, tuple):          # a fixed number of values: (beta1, beta2), (H, W), (start, end)
        return dict(action=Values, kind=kind, count=len(default), help=help_)
    if isinstance(default, list):           # one per level of a model: any number
        return dict(action=Values, kind=kind, sequence=list, help=help_)
    if re.search(r'\b(tuple|list)\b', str(annotation)):     # a number, or a schedule of them
        return dict(action=Values, kind=kind, scalar=True, count=2 if 'tuple' in str(annotation) else None,
                    sequence=tuple if 'tuple' in str(annotation) else list, help=help_)
    return dict(type=kind, help=help_)


def defaults_of(source):
    """{argument: default} of a dataclass or a function (a default None becomes JSON-typed)."""
    if dataclasses.is_dataclass(source):
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(source)}
    return {k: p.default for k, p in inspect.signature(source).parameters.items()
            if p.default is not inspect.Parameter.empty}


def annotations_of(source):
    return {f.name: f.type for f in dataclasses.fields(source)} if dataclasses.is_dataclass(source) else {}


def add_config(parser, cls, nested=None, aliases=None):
    """Flags for every field of the dataclass ``cls``. ``nested``: {dict field: the dataclass or function
    whose arguments are its dotted keys}; ``aliases``: {field: [more flag names]}. `read_config` turns the
    parsed arguments back into a ``cls``. Fields named in ``cls.hidden`` (a ClassVar) are left out of --help."""
    comments, nested, aliases = field_comments(cls), nested or {}, aliases or {}
    types, hidden = annotations_of(cls), getattr(cls, 'hidden', ())
    for name, default in defaults_of(cls).items():
        names = ['--' + name.replace('_', '-'), *aliases.get(name, ())]
        if name in nested:
            add_dotted(parser, names, nested[name], comments.get(name, ''), hide=name in hidden)
        else:
            shown = comments.get(name, '') + (' (default: %(default)s)' if default not in ('', None) else '')
            shown = argparse.SUPPRESS if name in hidden else shown.strip()
            parser.add_argument(*names, default=default, **flag_options(default, shown, types[name]))
    return parser


def add_dotted(parser, names, source, help_='', hide=False):
    """``--name JSON`` and ``--name.key VALUE`` for every argument of ``source``; read with `dotted`."""
    dest = names[0][2:].replace('-', '_')
    keys, types = defaults_of(source), annotations_of(source)
    help_ = f"{help_} (--{names[0][2:]}.KEY VALUE, or all as JSON; keys: {', '.join(k.replace('_', '-') for k in keys)})"
    help_ = argparse.SUPPRESS if hide else help_.strip()
    parser.add_argument(*names, dest=dest, type=parse_dict, default={}, metavar='JSON', help=help_)
    for key, value in keys.items():          # absent unless given (SUPPRESS), so a given null stays None
        parser.add_argument(f"{names[0]}.{key.replace('_', '-')}", dest=f'{dest}.{key}', default=argparse.SUPPRESS,
                            **flag_options(value, argparse.SUPPRESS, types.get(key, '')))


def dotted(args, name, source):
    """The dict of ``--name``: its JSON, then the dotted keys given; a key ``source`` does not take is an error."""
    value, prefix = dict(getattr(args, name)), name + '.'
    value.update({k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)})
    unknown = sorted(set(value) - set(defaults_of(source)))
    if unknown:
        raise ValueError(f"--{name.replace('_', '-')}: unknown key {', '.join(map(repr, unknown))}; keys: "
                         f"{', '.join(defaults_of(source))}")
    return value


def read_config(cls, args, nested=None):
    """The ``cls`` the parsed ``args`` describe (``nested``: {dict field: the source of its keys})."""
    nested = nested or {}
    return cls(**{name: dotted(args, name, nested[name]) if name in nested else getattr(args, name)
                  for name in defaults_of(cls)})


def normalize(argv):
    """Old spellings: ``--batch_size=32`` -> ``--batch-size=32`` (underscores in the name only, and
    nothing after a bare ``--``: what follows it is values)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == '--':
            return out + list(argv[i:])
        if arg.startswith('--'):
            name, eq, value = arg.partition('=')
            arg = name.replace('_', '-') + eq + value
        out.append(arg)
    return out
