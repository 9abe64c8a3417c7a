"""Loading plugins: the `dvm` entry-point group, the same way for bundled and third-party ones.

`DVM_PLUGINS=name1,name2` restricts which entry points load (the names on the left of the
entry point); `DVM_TRACE_PLUGINS=1` logs every hook call.
"""

from __future__ import annotations

import importlib.metadata
import os

import pluggy
import structlog

from dvm_core import hookspecs
from dvm_core.jobs import JobKind, TranscriptChecker

ENTRY_POINT_GROUP = "dvm"
log = structlog.get_logger("dvm.plugins")


class PluginError(Exception):
    """A plugin that cannot load or registers something invalid."""


def plugin_manager(only: list[str] | None = None, load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("dvm")
    pm.add_hookspecs(hookspecs)
    if only is None and os.environ.get("DVM_PLUGINS") is not None:
        only = [n.strip() for n in os.environ["DVM_PLUGINS"].split(",") if n.strip()]
    try:
        _load(pm, only, load_entry_points)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} does not fit the hooks: {exc}") from None
    except ImportError as exc:
        raise PluginError(f"a plugin failed to import: {exc}") from None
    check(pm)
    if os.environ.get("DVM_TRACE_PLUGINS"):
        pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: log.debug("hook call", hook=name, plugins=[i.plugin_name for i in impls]),
            lambda outcome, name, impls, kwargs: None,
        )
    return pm


def _load(pm: pluggy.PluginManager, only: list[str] | None, load_entry_points: bool) -> None:
    if load_entry_points:
        names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if only is not None:
            unknown = sorted(set(only) - names)
            if unknown:
                raise PluginError(
                    f"no installed plugin named {', '.join(unknown)} (installed: {', '.join(sorted(names)) or 'none'})"
                )
            for name in only:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        else:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)


def check(pm: pluggy.PluginManager) -> None:
    """Fail loudly on a hook implementation that matches no hook (a misspelling)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None


def collect_job_kinds(pm: pluggy.PluginManager, config: dict) -> dict[int, JobKind]:
    """Ask every plugin for its job kinds and apply the config's `[kinds]` renumbering."""
    kinds: dict[int, JobKind] = {}
    owners: dict[str, str] = {}
    overrides: dict[str, int] = {}
    for name, number in (config.get("kinds") or {}).items():
        if isinstance(number, bool) or not isinstance(number, int) or not 5000 <= number <= 5999:
            raise PluginError(f"[kinds] {name} = {number!r}: a job kind is a whole number in 5000-5999")
        overrides[str(name)] = number

    def add(job_kind: JobKind, plugin: str) -> None:
        if job_kind.name in overrides:
            job_kind.kind = overrides[job_kind.name]
            job_kind.__post_init__()
        if job_kind.name in owners:
            raise PluginError(f"job kind name {job_kind.name!r} registered by both "
                              f"{owners[job_kind.name]!r} and {plugin!r}")
        if job_kind.kind in kinds:
            raise PluginError(f"kind {job_kind.kind} registered twice ({kinds[job_kind.kind].name!r}"
                              f" and {job_kind.name!r}); renumber one under [kinds] in the config")
        owners[job_kind.name] = plugin
        job_kind.plugin = plugin
        kinds[job_kind.kind] = job_kind

    checkers: dict[str, tuple[TranscriptChecker, str]] = {}
    for impl in pm.hook.register_job_kinds.get_hookimpls():
        def register(job_kind: JobKind | TranscriptChecker, _plugin=impl.plugin_name) -> None:
            if isinstance(job_kind, TranscriptChecker):
                if job_kind.format in checkers:
                    raise PluginError(f"transcript format {job_kind.format!r} registered by both "
                                      f"{checkers[job_kind.format][1]!r} and {_plugin!r}")
                checkers[job_kind.format] = (job_kind, _plugin)
                return
            if not isinstance(job_kind, JobKind):
                raise PluginError(f"plugin {_plugin!r} registered {job_kind!r}, not a JobKind")
            add(job_kind, _plugin)
        impl.function(**{a: {"register": register, "config": config}[a] for a in impl.argnames})
    if checkers:   # the verify kind: once, for every format a loaded plugin checks
        from dvm_core import transcripts
        add(transcripts.job_kind([c for c, _ in checkers.values()]),
            ",".join(dict.fromkeys(plugin for _, plugin in checkers.values())))
    unknown = set(overrides) - set(owners)
    if unknown:
        raise PluginError(f"[kinds] names job kinds no plugin registered: {', '.join(sorted(unknown))}")
    return kinds


def describe(pm: pluggy.PluginManager, config: dict) -> list[dict]:
    """What `dvm plugins` prints: each plugin, its hooks, version and job kinds."""
    dists = {}
    for plugin, dist in pm.list_plugin_distinfo():
        dists[pm.get_name(plugin)] = dist
    kinds = collect_job_kinds(pm, config)
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0]):
        dist = dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "hooks": hooks,
            "version": dist.version if dist else None,
            "package": dist.metadata["Name"] if dist else None,
            "kinds": sorted(
                ({"kind": k.kind, "result_kind": k.kind + 1000, "name": k.name}
                 for k in kinds.values() if name in k.plugin.split(",")), key=lambda d: d["kind"]),
        })
    return out
