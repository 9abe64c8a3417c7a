"""The plugin contract: the hooks a DVM plugin may implement.

A plugin is any module or object with functions marked ``@dvm_core.hookimpl`` whose names match
the hooks below. It is found through the ``dvm`` entry-point group, bundled and third-party
plugins alike. A minimal plugin package (see ``examples/dvm-textstats``)::

    # pyproject.toml
    [project.entry-points.dvm]
    textstats = "dvm_textstats"

    # dvm_textstats.py
    from dvm_core import hookimpl, JobKind, JobResult, JobInputError

    def parse(request):
        text = " ".join(i.data for i in request.inputs if i.type == "text")
        if not text:
            raise JobInputError("send the text in an input of type 'text'")
        return text

    def run(ctx, text):                      # runs in a worker thread
        ctx.progress(50, "counting")
        ctx.check_cancelled()
        return JobResult({"words": len(text.split())})

    @hookimpl
    def register_job_kinds(register):
        register(JobKind(kind=5790, name="text-stats", description="Counts words.",
                         run=run, parse=parse, params={}))

Data comes by URL: for an input of type ``url``, ``ctx.fetch(input)`` returns a local path,
downloaded, checked against its sha256 and decrypted. Files go back the same way: return
``JobResult(content, artifacts=[Artifact(path, "application/octet-stream")])`` and the core
uploads them to the provider's Blossom servers (encrypted for a private request) and lists
them in the result; ``Artifact(path, "application/json", signed=True)`` has the worker sign the
file's text with the provider's key first (a kind-1750 event, e.g. a training transcript), and
``dvm_core.open_signed_file`` checks one. ``dvm_core.archives.extract_archive`` unpacks zip/tar
inputs safely.

The core owns everything else: relays, decryption, de-duplication, persistence, feedback,
time limits, cancellation, payment, moving data and publishing the result. A plugin never sees
a key.

Implementations may take any subset of a hook's arguments, by name. A hook implementation whose
name matches no hook here makes the worker refuse to start (a misspelt hook fails loudly).
"""

import pluggy

hookspec = pluggy.HookspecMarker("dvm")


@hookspec
def register_job_kinds(register, config):
    """Register the job kinds this plugin serves.

    :param register: call ``register(JobKind(...))`` once per kind (see `dvm_core.jobs.JobKind`).
        Registering a kind number or name that another plugin already took is an error. A plugin
        whose jobs write training transcripts also calls ``register(TranscriptChecker(...))``
        (`dvm_core.jobs.TranscriptChecker`): the worker then serves the verify kind, 5753
        ``training-verify`` (`dvm_core.transcripts`), once for every format registered.
    :param config: the worker's whole configuration as a dict (from the TOML file); a plugin
        reads its own table, ``config["plugins"]["<plugin name>"]``, if it has settings.
    """


@hookspec(firstresult=True)
def price_job(job_kind, request, job, config):
    """Price one job of a kind that has no `JobKind.price` of its own, in the worker's unit.

    A plugin prices its own kinds with `JobKind.price` (next to their `pricing` text); this hook
    is for pricing across plugins, e.g. a provider's plugin that prices other plugins' kinds.
    Called once per request, after `JobKind.parse` (and `JobKind.precheck`, if the kind has
    one) accepted it. Return a whole number (0 makes the job free) or None to leave it to the
    next plugin and finally to the config (``[prices] <kind name> = N``, else
    ``default_price``). Stops at the first non-None result. A kind priced here must say how in
    `JobKind.pricing`: the announcement shows it, and for a kind without it the worker asks the
    fixed price it announces, whatever this hook returns (customers pay only what was announced).

    :param job_kind: the `JobKind` being priced; check ``job_kind.name`` to price only yours.
    :param request: the parsed `JobRequest` (its ``bid_msats`` is the customer's ceiling).
    :param job: what ``job_kind.precheck`` (else ``parse``) returned, e.g. to price by the samples
        × epochs counted in the data.
    :param config: the worker's whole configuration as a dict.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``dvm`` command line.

    :param cli: the ``dvm`` `click.Group`; decorate new commands with ``@cli.command()``
        (or ``cli.add_command``). A command named like a built-in one is an error.

    Plugins are loaded for this only when a command that is not built in is asked for (or
    ``dvm --help``), so keep heavy imports (torch) inside the command's function::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("path")
            def inspect(path):
                "Show what a model file holds."
                from .heavy import show      # imported only when the command runs
                show(path)
    """


@hookspec
def check_setup(config):
    """Say what a provider should fix in this plugin's settings; `dvm doctor` prints it.

    :param config: the worker's whole configuration as a dict (as for `register_job_kinds`).
    :returns: a list of ``(level, text)``, one per problem: level ``"warn"`` (the plugin's kinds
        work, but likely not as the provider means) or ``"FAIL"`` (they cannot work); the text
        one line that says what is wrong and the fix. ``[]`` when all is well. Keep it quick and
        free of network I/O; a setting that must stop the worker is raised in
        `register_job_kinds` instead.
    """
