"""A static check of a torch.save pickle, run before torch's `weights_only` unpickler ever sees the file.

torch's safe unpickler runs no code, but it still lets a pickle allocate what the file does not store
(`builtins.bytearray(5 << 30)`, `torch.FloatTensor(<nested lists>)`) and build object graphs whose shared
references expand exponentially (a list of two references to one list, 64 levels deep: 2^64 items for any
`str()`, and a tuple like it used as a dict key makes `torch.load` hash forever in C). This module reads the
pickle's opcodes with `pickletools.genops`, which parses and never executes, and replays them on an abstract
stack of nodes (no Python object of the file is built). It refuses, with one line, anything but what a
checkpoint needs:

- globals: `collections.OrderedDict`, the tensor rebuilders (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`), the storage types, `torch.Size`, `torch.device`, dtypes and `argparse.Namespace`
  (training scripts store their arguments). Everything else is refused: code, and the allocators torch allows;
- every tensor's data is a record of the zip: the persistent id names a record that exists and holds the
  bytes it claims, and the view (offset, sizes, strides) stays inside it;
- the pickle's own work is bounded: its size, its opcode count, big-integer length, nesting depth, and the
  size of every object expanded as a tree (shared references counted each time they are reached, so a
  memo bomb is refused; cycles are refused); the memory the unpickler will allocate for the objects is
  estimated and checked against the budget (`limits.check_memory`) before torch builds anything.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Any

from caitdeploy.core.errors import CaitError

MAX_PICKLE_BYTES = 64 << 20  # data.pkl; a ViT-H state dict's pickle is ~100 KB
MAX_OPS = 4_000_000  # opcodes
MAX_DEPTH = 32  # nesting; checkpoints need < 10 (dict -> state dict -> tensor args -> shape)
MAX_EXPANDED = 4_000_000  # units (one per object, plus its characters) of any object expanded as a tree
MAX_LONG_BYTES = 64  # a LONG opcode's payload: no checkpoint number needs more than 512 bits
BYTES_PER_NODE = 160  # what the unpickler allocates per object at most (list/dict header + slots)

# storage classes -> bytes per element (`torch.save` names the typed-storage class in the persistent id)
STORAGE_TYPES = {
    "torch.FloatStorage": 4,
    "torch.HalfStorage": 2,
    "torch.BFloat16Storage": 2,
    "torch.DoubleStorage": 8,
    "torch.LongStorage": 8,
    "torch.IntStorage": 4,
    "torch.ShortStorage": 2,
    "torch.CharStorage": 1,
    "torch.ByteStorage": 1,
    "torch.BoolStorage": 1,
    "torch.storage.UntypedStorage": 1,
    "torch.ComplexFloatStorage": 8,
    "torch.ComplexDoubleStorage": 16,  # loaded, then refused by key (tensor_problem)
}
DTYPES = {
    "torch." + n
    for n in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
CALLABLES = {
    "collections.OrderedDict",
    "_codecs.encode",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.Size",
    "torch.device",
}
CLASSES = {"argparse.Namespace"}  # NEWOBJ + BUILD(dict): a plain attribute bag
# what torch's weights_only loader also lets a pickle call (its allocators: bytearray(N), torch.FloatTensor(lists))
TORCH_ALSO_ALLOWS = {"builtins.bytearray", "builtins.set", "builtins.complex", "collections.Counter"}
ALLOWED = set(STORAGE_TYPES) | DTYPES | CALLABLES | CLASSES

ATOM, LIST, DICT, TUPLE, SET, GLOBAL, STORAGE, TENSOR, OBJ = range(9)
_KIND = {LIST: "list", DICT: "dict", TUPLE: "tuple", SET: "set", OBJ: "Namespace"}
REFUSED = "caitdeploy never runs code from a checkpoint"


class PickleRefused(CaitError):
    """A pickle that `check_torch_zip` refuses; the message has no file name (the caller adds it)."""


@dataclass
class PickleFacts:
    ops: int  # opcodes
    objects: int  # objects the unpickler will build
    stored_bytes: int  # tensor bytes the file's records really hold (each record once)
    object_bytes: int  # estimated memory of the unpickled objects (tensors excluded: memory-mapped)
    max_depth: int
    max_expanded: int


class _Machine:
    """Abstract replay of a pickle: nodes instead of objects, no code, no allocation beyond the node tables."""

    def __init__(self, records: dict[str, int], prefix: str) -> None:
        self.records, self.prefix = records, prefix
        self.kind: list[int] = []
        self.own: list[int] = []  # units of the node itself (1 + its characters)
        self.kids: list[list[int] | None] = []
        self.value: list[Any] = []  # small atoms (str <= 256 chars, ints), global names, storage facts
        self.stack: list[int] = []
        self.marks: list[int] = []
        self.memo: dict[int, int] = {}
        self.storages: dict[str, int] = {}  # record key -> bytes the persistent ids claim
        self.object_bytes = 0

    # ---- nodes --------------------------------------------------------------------------------
    def node(self, kind: int, own: int = 1, kids: list[int] | None = None, value: Any = None) -> int:
        self.kind.append(kind)
        self.own.append(own)
        self.kids.append(kids)
        self.value.append(value)
        self.object_bytes += BYTES_PER_NODE + 8 * len(kids or ())
        return len(self.kind) - 1

    def push(self, n: int) -> None:
        self.stack.append(n)

    def pop(self) -> int:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise PickleRefused("malformed pickle (stack underflow)")
        return self.stack.pop()

    def pop_mark(self) -> list[int]:
        if not self.marks:
            raise PickleRefused("malformed pickle (no MARK)")
        at = self.marks.pop()
        items, self.stack = self.stack[at:], self.stack[:at]
        return items

    def top(self) -> int:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise PickleRefused("malformed pickle (stack underflow)")
        return self.stack[-1]

    def add_kids(self, target: int, items: list[int], kinds: tuple[int, ...], what: str) -> None:
        if self.kind[target] not in kinds:
            raise PickleRefused(f"malformed pickle ({what} on a {_KIND.get(self.kind[target], 'non-container')})")
        kids = self.kids[target]
        assert kids is not None
        kids.extend(items)
        self.object_bytes += 16 * len(items)

    def atom_value(self, n: int) -> Any:
        return self.value[n] if self.kind[n] == ATOM else None

    def ints(self, n: int, what: str) -> tuple[int, ...]:
        vals = [self.atom_value(k) for k in (self.kids[n] or ())] if self.kind[n] == TUPLE else None
        if vals is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise PickleRefused(f"a tensor's {what} is not a tuple of integers")
        return tuple(vals)

    # ---- the opcodes ----------------------------------------------------------------------------
    def run(self, data: bytes) -> PickleFacts:
        ops = 0
        stopped = False
        try:
            for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
                ops += 1
                if ops > MAX_OPS:
                    raise PickleRefused(f"refused: the pickle has more than {MAX_OPS} opcodes")
                if stopped:
                    raise PickleRefused("malformed pickle (data after STOP)")
                name = op.name
                if name == "STOP":
                    stopped = True
                    if len(self.stack) != 1 or self.marks:
                        raise PickleRefused("malformed pickle (STOP with an unbalanced stack)")
                    continue
                self.step(name, arg)
        except PickleRefused:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError, EOFError) as e:
            # pickletools on truncated or corrupt data
            raise PickleRefused(
                f"truncated or corrupt pickle ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            ) from None
        if not stopped:
            raise PickleRefused("truncated or corrupt pickle (no STOP opcode)")
        depth, expanded = self.measure()
        return PickleFacts(ops, len(self.kind), sum(self.storages.values()), self.object_bytes, depth, expanded)

    def step(self, name: str, arg: Any) -> None:  # one branch per opcode family, flat on purpose
        if name in ("PROTO", "FRAME"):
            return
        if name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
            if name in ("LONG1", "LONG4", "LONG") and isinstance(arg, int) and arg.bit_length() > 8 * MAX_LONG_BYTES:
                raise PickleRefused(
                    f"refused: the pickle holds an integer of {arg.bit_length()} bits (more than {8 * MAX_LONG_BYTES})"
                )
            self.push(self.node(ATOM, 2, value=arg))
        elif name in ("BINFLOAT", "FLOAT", "NONE", "NEWTRUE", "NEWFALSE"):
            self.push(self.node(ATOM, 2, value={"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, arg)))
        elif name in (
            "UNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "BINUNICODE8",
            "STRING",
            "BINSTRING",
            "SHORT_BINSTRING",
            "BINBYTES",
            "SHORT_BINBYTES",
            "BINBYTES8",
        ):
            n = len(arg)
            self.object_bytes += n
            self.push(self.node(ATOM, 1 + n, value=arg if n <= 256 else None))
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
            kind = {"EMPTY_LIST": LIST, "EMPTY_DICT": DICT, "EMPTY_SET": SET, "EMPTY_TUPLE": TUPLE}[name]
            self.push(self.node(kind, kids=[]))
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name in ("LIST", "TUPLE", "DICT", "FROZENSET"):
            items = self.pop_mark()
            if name == "DICT" and len(items) % 2:
                raise PickleRefused("malformed pickle (DICT with an odd number of items)")
            self.push(self.node({"LIST": LIST, "TUPLE": TUPLE, "DICT": DICT, "FROZENSET": SET}[name], kids=items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))][::-1]
            self.push(self.node(TUPLE, kids=items))
        elif name == "APPEND":
            item = self.pop()
            self.add_kids(self.top(), [item], (LIST,), "APPEND")
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = self.pop_mark()
            if name == "SETITEMS" and len(items) % 2:
                raise PickleRefused("malformed pickle (SETITEMS with an odd number of items)")
            kinds = {"APPENDS": (LIST,), "SETITEMS": (DICT,), "ADDITEMS": (SET,)}[name]
            self.add_kids(self.top(), items, kinds, name)
        elif name == "SETITEM":
            v = self.pop()
            k = self.pop()
            self.add_kids(self.top(), [k, v], (DICT,), "SETITEM")
        elif name == "POP":
            if self.marks and len(self.stack) == self.marks[-1]:
                self.marks.pop()  # POP of a MARK
            else:
                self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.push(self.top())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                raise PickleRefused(f"malformed pickle (memo {arg} read before it was written)")
            self.push(self.memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                dotted = str(arg).replace(" ", ".")
            else:
                attr, mod = self.atom_value(self.pop()), self.atom_value(self.pop())
                if not (isinstance(mod, str) and isinstance(attr, str)):
                    raise PickleRefused("malformed pickle (STACK_GLOBAL without two strings)")
                dotted = f"{mod}.{attr}"
            self.push(self.node(GLOBAL, 1 + len(dotted), value=_allowed_global(dotted)))
        elif name == "REDUCE":
            args = self.pop()
            fn = self.pop()
            self.push(self.reduce(fn, args))
        elif name == "NEWOBJ":
            args = self.pop()
            cls = self.pop()
            if self.kind[cls] != GLOBAL or self.value[cls] not in CLASSES:
                raise PickleRefused("malformed pickle (NEWOBJ of something that is not a class)")
            if self.kind[args] != TUPLE or self.kids[args]:
                raise PickleRefused(f"refused: {self.value[cls]} is built with arguments; a checkpoint's is not")
            self.push(self.node(OBJ, kids=[]))
        elif name == "BUILD":
            state = self.pop()
            obj = self.top()
            if self.kind[obj] not in (OBJ, DICT) or self.kind[state] != DICT:  # Namespace attributes, or a
                raise PickleRefused(
                    "refused: the pickle sets the state of an object other than an "  # state
                    "argparse.Namespace or a state dict (BUILD)"
                )  # dict's `_metadata`
            self.add_kids(obj, [state], (OBJ, DICT), "BUILD")
        elif name == "BINPERSID":
            self.push(self.storage(self.pop()))
        else:  # INST, OBJ, NEWOBJ_EX, EXT1/2/4, PERSID, BYTEARRAY8, NEXT_BUFFER, READONLY_BUFFER, ...
            raise PickleRefused(f"refused: the pickle uses opcode {name}, which torch.save never writes")

    def reduce(self, fn: int, args: int) -> int:
        if self.kind[fn] != GLOBAL:
            raise PickleRefused("malformed pickle (REDUCE of something that is not a function)")
        name = self.value[fn]
        if name not in CALLABLES:
            raise PickleRefused(f"refused: the pickle calls {name}, which a checkpoint never needs")
        if self.kind[args] != TUPLE:
            raise PickleRefused(f"malformed pickle ({name} called without an argument tuple)")
        a = self.kids[args] or []
        if name == "collections.OrderedDict":
            if a:
                raise PickleRefused(
                    "refused: collections.OrderedDict is called with arguments (torch.save writes its items separately)"
                )
            return self.node(DICT, kids=[])
        if name == "_codecs.encode":  # how protocol 2 writes bytes: encode(text, "latin1")
            vals = [self.atom_value(k) for k in a]
            if len(vals) != 2 or vals[1] != "latin1" or self.kind[a[0]] != ATOM:
                raise PickleRefused("refused: _codecs.encode is called other than as protocol 2 writes bytes")
            return self.node(ATOM, self.own[a[0]])
        if name == "torch.Size":
            if len(a) != 1:
                raise PickleRefused("malformed pickle (torch.Size takes one tuple)")
            self.ints(a[0], "size")
            return self.node(TUPLE, kids=list(self.kids[a[0]] or []))
        if name == "torch.device":
            vals = [self.atom_value(k) for k in a]
            if not (1 <= len(vals) <= 2 and isinstance(vals[0], str) and len(vals[0]) <= 32):
                raise PickleRefused("malformed pickle (torch.device takes a short device name)")
            return self.node(ATOM, 2, value=None)
        if name == "torch._utils._rebuild_parameter":
            if len(a) != 3 or self.kind[a[0]] != TENSOR:
                raise PickleRefused("malformed pickle (a parameter that does not wrap a tensor)")
            self.empty_hooks(a[2])
            return a[0]
        # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
        if len(a) not in (6, 7) or self.kind[a[0]] != STORAGE:
            raise PickleRefused("malformed pickle (a tensor whose data is not a storage record of the file)")
        if len(a) == 7 and (self.kind[a[6]] not in (ATOM, DICT) or (self.kind[a[6]] == DICT and self.kids[a[6]])):
            raise PickleRefused("refused: a tensor with metadata (a tensor subclass); checkpoints hold plain tensors")
        self.empty_hooks(a[5])
        key, numel = self.value[a[0]]
        offset = self.atom_value(a[1])
        size, stride = self.ints(a[2], "size"), self.ints(a[3], "stride")
        if (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or offset < 0
            or len(size) != len(stride)
            or len(size) > 16
            or any(s < 0 for s in size)
            or any(s < 0 for s in stride)
        ):
            raise PickleRefused(
                f"a tensor on record {key!r} has a malformed view (offset {offset!r}, "
                f"size {size[:16]}, stride {stride[:16]})"
            )
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= numel:
                raise PickleRefused(
                    f"a tensor of shape {size} reaches element {last} of record {key!r}, which holds {numel}"
                )
        return self.node(TENSOR, 8)

    def empty_hooks(self, n: int) -> None:
        if self.kind[n] != DICT or self.kids[n]:
            raise PickleRefused("refused: a tensor with backward hooks (they are code)")

    def storage(self, pid: int) -> int:
        a = self.kids[pid] if self.kind[pid] == TUPLE else None
        vals = [self.atom_value(k) for k in a] if a is not None and len(a) == 5 else None
        if a is None or vals is None or vals[0] != "storage" or self.kind[a[1]] != GLOBAL:
            raise PickleRefused("malformed pickle (a persistent id that is not a torch.save storage)")
        stype, key, location, numel = self.value[a[1]], vals[2], vals[3], vals[4]
        if stype not in STORAGE_TYPES:
            raise PickleRefused(f"refused: a storage of type {stype}")
        if (
            not isinstance(key, str)
            or not isinstance(location, str)
            or not isinstance(numel, int)
            or isinstance(numel, bool)
            or numel < 0
        ):
            raise PickleRefused("malformed pickle (a storage id without record name, location and size)")
        record = f"{self.prefix}data/{key}"
        have = self.records.get(record)
        if have is None:
            raise PickleRefused(f"a tensor's data names record {record!r}, which the file does not have")
        need = numel * STORAGE_TYPES[stype]
        if need > have:
            raise PickleRefused(f"record {record!r} holds {have} bytes; its storage claims {need}")
        self.storages[key] = max(self.storages.get(key, 0), need)
        return self.node(STORAGE, 8, value=(key, numel))

    # ---- the whole graph ------------------------------------------------------------------------
    def measure(self) -> tuple[int, int]:
        """(deepest nesting, largest tree-expanded size) over every node built, reachable or not (torch builds
        and hashes them all); a cycle is refused. Iterative: a 200,000-deep list does not recurse."""
        n = len(self.kind)
        depth = [0] * n
        size = [0] * n
        state = bytearray(n)  # 0 new, 1 on the path, 2 done
        worst_d = worst_s = 0
        for root in range(n):
            if state[root]:
                continue
            path = [(root, 0)]
            state[root] = 1
            while path:
                v, i = path[-1]
                kids = self.kids[v] or ()
                if i < len(kids):
                    path[-1] = (v, i + 1)
                    k = kids[i]
                    if state[k] == 1:
                        raise PickleRefused(
                            f"refused: a {_KIND.get(self.kind[k], 'container')} contains itself (a cyclic pickle)"
                        )
                    if state[k] == 0:
                        state[k] = 1
                        path.append((k, 0))
                        if len(path) > 32 * MAX_DEPTH:  # a chain of containers this long nests too deep: refuse
                            raise PickleRefused(_TOO_DEEP)  # it now, not after walking all of it (200,000 deep)
                    continue
                path.pop()
                state[v] = 2
                d = 1 + max((depth[k] for k in kids), default=0)
                s = min(self.own[v] + sum(size[k] for k in kids), MAX_EXPANDED + 1)
                depth[v], size[v] = d, s
                if d > MAX_DEPTH:
                    raise PickleRefused(_TOO_DEEP)
                if s > MAX_EXPANDED:
                    raise PickleRefused(
                        f"refused: a {_KIND.get(self.kind[v], 'value')} of the pickle expands to "
                        f"more than {MAX_EXPANDED} items through shared references (a memo bomb)"
                    )
                worst_d, worst_s = max(worst_d, d), max(worst_s, s)
        return worst_d, worst_s


_TOO_DEEP = f"refused: the pickle nests containers more than {MAX_DEPTH} deep; a checkpoint needs fewer than 10 levels"


def _allowed_global(dotted: str) -> str:
    import _compat_pickle

    mod, _, attr = dotted.rpartition(".")  # protocol 2 writes Python 2 names (__builtin__, copy_reg), as pickle
    mod, attr = _compat_pickle.NAME_MAPPING.get((mod, attr), (_compat_pickle.IMPORT_MAPPING.get(mod, mod), attr))
    dotted = f"{mod}.{attr}"
    if dotted in ALLOWED:
        return dotted
    if dotted.startswith("torch.") or dotted in TORCH_ALSO_ALLOWS:
        raise PickleRefused(
            f"refused: the pickle uses {dotted[:120]}, which builds data the file does not store "
            "(caitdeploy loads only tensors whose bytes are records of the file)"
        )
    raise PickleRefused(f"refused: the pickle needs code to load (it references {dotted[:120]}); {REFUSED}")


def check_torch_zip(z: zipfile.ZipFile, file_size: int) -> PickleFacts:
    """Check a torch.save zip's pickle (see the module docstring); raises PickleRefused (no file name)."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PickleRefused(f"zip record {dup[:120]!r} appears twice (readers could disagree on which is meant)")
    pkls = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
    if len(pkls) != 1:
        raise PickleRefused(
            "not a torch.save zip: "
            + ("no <name>/data.pkl record" if not pkls else "more than one <name>/data.pkl record")
        )
    pkl = pkls[0]
    prefix = pkl.filename[: -len("data.pkl")]
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise PickleRefused(
            f"refused: its pickle is {pkl.file_size} bytes, more than the {MAX_PICKLE_BYTES} a checkpoint's needs"
        )
    with z.open(pkl) as f:
        data = f.read(MAX_PICKLE_BYTES + 1)
    if len(data) != pkl.file_size:
        raise PickleRefused("truncated or corrupt checkpoint (data.pkl is shorter than its zip entry says)")
    records = {i.filename: i.file_size for i in infos}
    facts = _Machine(records, prefix).run(data)
    from caitdeploy.core.budgets import check_memory

    try:
        check_memory(facts.object_bytes + 2 * len(data), f"unpickling its {facts.objects} objects")
    except CaitError as e:
        raise PickleRefused(str(e)) from None
    return facts
