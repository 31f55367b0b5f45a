"""torchx components (torchx_components/iat.py) and the repo's .torchxconfig.

- every component passes torchx's own validation (the parse behind ``torchx run ... --help``);
- the command a component builds parses under torchrun's parser and then the program's own;
- ``torchx run --dryrun`` for a 2x8 GPU job on slurm and on kubernetes: the request is parsed
  back and checked (nodes, GPUs, CPUs and memory per node, the torchrun command);
- the named resources (torchx_components/resources.py): registered with torchx through setup.py's
  entry points, each one reaching every component's role, unknown names refused with the list;
- docker/Dockerfile installs what the Makefile installs (``make -n``), pins included, for both
  variants, and .dockerignore keeps data, runs and environments out of the image;
- one real ``torchx run -s local_cwd`` of the whole pipeline on 2 ranks (marked ``slow``, ~30 s on 2 cores).
"""

import configparser
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess

import pytest
import yaml
from torch.distributed.run import get_args_parser as torchrun_parser
from torchx.components.component_test_base import ComponentTestCase
from torchx.schedulers import get_scheduler_factories

from iat_rec.data.instance_log import InstanceLog, time_split
from tests.helpers import BIN, COMPONENT, REPO, synth_log
from torchx_components import iat, resources

MODULES = {
    "compress": "pipelines.compress",
    "export": "pipelines.export",
    "rank": "pipelines.rank",
    "pipeline": "pipelines.pipeline",
}

# every named program option set, so each flag a component can emit is checked
FULL_ARGS = {
    "compress": dict(
        data="/d/log", out="/d/run", scheme="user", steps=7, epochs=1.5, batch_size=16, config="/d/c.yaml", resume=True
    ),
    "export": dict(stage1="/d/run", out="/d/tokens", dtype="fp16", batch_size=512),
    "rank": dict(
        data="/d/log",
        tokens="/d/tokens",
        out="/d/run2",
        history="both",
        reader="din",
        stage1="/d/run",
        warm_start=True,
        steps=7,
        epochs=1.5,
        batch_size=16,
        config="/d/c.yaml",
        resume=True,
    ),
    "pipeline": dict(
        data="/d/log",
        work="/d/work",
        scheme="user",
        history="both",
        reader="longer",
        seed=3,
        dtype="fp16",
        compress_config="/d/c1.yaml",
        rank_config="/d/c2.yaml",
    ),
}


def torchrun_argv(app) -> list[str]:
    """The torchrun command line of a dist.ddp AppDef (its role runs ``bash -c '<cmd>'``)."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    argv = shlex.split(role.args[1])
    assert argv[0] == "torchrun"
    return argv


def torchx(
    *args: str, env: dict | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """The torchx CLI, run from the repo root (so .torchxconfig applies) with the venv on PATH;
    ``check``: assert that it succeeded."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    full_env.pop("TORCHXCONFIG", None)  # the repo's .torchxconfig, unless the test names another
    full_env.update(env or {})
    proc = subprocess.run(
        [str(BIN / "torchx"), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 or not check, (
        f"torchx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


# ---- torchx's component validation ---------------------------------------------------------------


class TestComponentsValidate(ComponentTestCase):
    """What ``torchx run torchx_components/iat.py:<name> --help`` checks (types, docstrings)."""

    def test_compress(self) -> None:
        self.validate(iat, "compress")

    def test_export(self) -> None:
        self.validate(iat, "export")

    def test_rank(self) -> None:
        self.validate(iat, "rank")

    def test_pipeline(self) -> None:
        self.validate(iat, "pipeline")


def test_linter_accepts_every_component():
    from torchx.specs.file_linter import validate

    for name in MODULES:
        assert validate(iat.__file__, name) == [], name


# ---- the command each component builds ------------------------------------------------------------


def test_options_left_unset_are_not_passed_and_extra_comes_last():
    argv = torchrun_argv(iat.compress(*"--emb-dim 8 --steps 2".split(), data="LOG", out="RUN", steps=5))
    program = argv[argv.index("-m") + 2 :]
    assert argv[argv.index("-m") + 1] == "pipelines.compress"
    # only what was given (no --scheme/--batch-size/--config/--resume), extra last so it wins
    assert program == [*"--data LOG --out RUN --steps 5 --emb-dim 8 --steps 2".split()]


def test_single_node_defaults():
    app = iat.compress(data="LOG", out="RUN")
    (role,) = app.roles
    args = torchrun_parser().parse_args(torchrun_argv(app)[1:])
    assert (role.num_replicas, args.nnodes, args.nproc_per_node) == (1, "1", "2")
    assert args.rdzv_endpoint == "localhost:0"  # one node: torchrun picks a free port
    # the default named resource: the old defaults' 2 CPUs and 8 GiB, no GPU, and the CPU image
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (2, 0, 8192)
    assert role.image == iat.IMAGE_CPU and role.max_retries == 0


@pytest.mark.parametrize("name", list(MODULES))
def test_max_restarts_reaches_torchrun_and_only_when_asked(name):
    """dist.ddp passes no --max_restarts (and local_cwd ignores max_retries): the components add it."""
    restarted = torchrun_parser().parse_args(torchrun_argv(getattr(iat, name)(max_restarts=3, **FULL_ARGS[name]))[1:])
    plain = torchrun_parser().parse_args(torchrun_argv(getattr(iat, name)(**FULL_ARGS[name]))[1:])
    assert (restarted.max_restarts, plain.max_restarts) == (3, 0)
    assert (
        getattr(iat, name)(max_restarts=3, **FULL_ARGS[name]).roles[0].env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    )
    assert restarted.training_script_args == plain.training_script_args
    with pytest.raises(ValueError, match="max_restarts"):
        getattr(iat, name)(max_restarts=-1, **FULL_ARGS[name])


@pytest.mark.parametrize("name", list(MODULES))
def test_command_parses_under_torchrun(name):
    """Program flags pass through torchrun's parser, which rejects ambiguous abbreviations (--run)."""
    app = getattr(iat, name)(j="2x8", h="iat.gpu.8", **FULL_ARGS[name])
    (role,) = app.roles
    args = torchrun_parser().parse_args(torchrun_argv(app)[1:])
    assert (args.nnodes, args.nproc_per_node, args.module, args.training_script) == ("2", "8", True, MODULES[name])
    assert role.num_replicas == 2 and role.resource.gpu == 8
    assert "--data" in args.training_script_args or "--stage1" in args.training_script_args


@pytest.mark.parametrize("name", ["compress", "export", "rank", "pipeline"])
def test_program_accepts_component_flags(name):
    """The program's own parser accepts every flag the component can emit."""
    module_name = MODULES[name]
    module = importlib.import_module(module_name)
    if not hasattr(module, "parser"):
        pytest.skip(f"{module_name} has no parser() to check the flags against")
    args = torchrun_parser().parse_args(torchrun_argv(getattr(iat, name)(**FULL_ARGS[name]))[1:])
    try:
        module.parser().parse_args(args.training_script_args)
    except SystemExit:
        pytest.fail(f"{module_name} rejects the component's arguments {args.training_script_args}")


# ---- .torchxconfig ----------------------------------------------------------------------------------


def test_repo_torchxconfig_has_only_known_options():
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(REPO / ".torchxconfig")
    schedulers = get_scheduler_factories()
    for section in parser.sections():
        if section.startswith("component:"):
            path, _, fn = section.removeprefix("component:").rpartition(":")
            assert path == COMPONENT and hasattr(iat, fn), section
            params = inspect.signature(getattr(iat, fn)).parameters
            assert all(key in params for key in parser[section]), section
        else:
            opts = schedulers[section](session_name="test").run_opts()
            assert all(opts.get(key) is not None for key in parser[section]), section
    assert parser["local_cwd"]["log_dir"] == "runs/torchx"


def test_component_defaults_section_applies(tmp_path):
    """A [component:torchx_components/iat.py:compress] section sets the component's defaults."""
    cfg = tmp_path / "torchxconfig"
    cfg.write_text(f"[component:{COMPONENT}:compress]\nj = 1x4\nh = iat.gpu.4\n")
    out = torchx(
        *"run --dryrun -s local_cwd".split(),
        f"{COMPONENT}:compress",
        *"--data LOG --out RUN".split(),
        env={"TORCHXCONFIG": str(cfg)},
    ).stdout
    assert "--nproc_per_node 4" in out
    assert f"'memMB': {resources.iat_gpu_4().memMB}" in out and "'gpu': 4" in out and "'cpu': 44" in out
    assert f"'image': '{iat.IMAGE_CUDA}'" in out


# ---- named resources (-h) -------------------------------------------------------------------------

IAT_NAMES = list(resources.NAMED_RESOURCES)


def test_named_resources_are_registered_with_torchx():
    """setup.py's torchx.named_resources entry points, as installed, are exactly resources.py's
    names, and torchx resolves each one to its factory's Resource."""
    from torchx.specs import named_resources

    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="torchx.named_resources")
        if ep.dist is not None and ep.dist.name == "iat-rec"
    }
    expected = {name: f"torchx_components.resources:{fn.__name__}" for name, fn in resources.NAMED_RESOURCES.items()}
    assert installed == expected, (
        "setup.py and resources.py disagree, or the install is stale: pip install --no-deps -e ."
    )
    for name, factory in resources.NAMED_RESOURCES.items():
        assert named_resources[name] == factory()
    # the sizes documented in resources.py: N eighths of an 8-GPU host, the CPU one as the old defaults
    assert resources.iat_cpu() == resources.Resource(cpu=2, gpu=0, memMB=8 * 1024)
    for n in (1, 2, 4, 8):
        assert named_resources[f"iat.gpu.{n}"] == resources.Resource(cpu=11 * n, gpu=n, memMB=64 * 1024 * n)


@pytest.mark.parametrize("name", list(MODULES))
def test_components_take_a_named_resource_only(name):
    params = inspect.signature(getattr(iat, name)).parameters
    assert not {"cpu", "gpu", "memMB"} & set(params)
    assert params["h"].default == resources.DEFAULT == "iat.cpu"


@pytest.mark.parametrize("h", [*IAT_NAMES, "gpu.xlarge"])  # and a name of torchx's own
@pytest.mark.parametrize("name", list(MODULES))
def test_role_gets_the_named_resource(name, h):
    from torchx.specs import named_resources

    expected = named_resources[h]
    per_node = max(expected.gpu, 1)
    app = getattr(iat, name)(j=f"2x{per_node}", h=h, **FULL_ARGS[name])
    (role,) = app.roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (expected.cpu, expected.gpu, expected.memMB)
    assert role.num_replicas == 2
    assert torchrun_parser().parse_args(torchrun_argv(app)[1:]).nproc_per_node == str(per_node)
    assert role.image == (iat.IMAGE_CUDA if expected.gpu else iat.IMAGE_CPU)
    # an image given is passed as it is
    assert getattr(iat, name)(h=h, j=f"1x{per_node}", image="reg/x:1", **FULL_ARGS[name]).roles[0].image == "reg/x:1"


@pytest.mark.parametrize("h", ["gpu.huge", "iat.gpu.3", "", "NULL"])
@pytest.mark.parametrize("name", list(MODULES))
def test_unknown_named_resource_is_refused_with_the_registered_names(name, h):
    with pytest.raises(ValueError, match="is not a registered named resource") as err:
        getattr(iat, name)(h=h, **FULL_ARGS[name])
    message = str(err.value)
    for known in IAT_NAMES:
        assert known in message
    assert "iat.gpu.8 (8 GPUs, 88 CPUs, 512 GiB)" in message
    assert "gpu.xlarge" in message and "aws_p5.48xlarge" in message  # torchx's own names count too
    assert "NULL" not in message.split("Also registered", 1)[1]  # torchx's sentinels are not sizes


def test_unknown_named_resource_fails_the_cli():
    proc = torchx(
        *"run --dryrun -s local_cwd".split(),
        f"{COMPONENT}:compress",
        *"-h gpu.huge --data LOG --out RUN".split(),
        check=False,
    )
    assert proc.returncode != 0
    assert "-h 'gpu.huge' is not a registered named resource. iat-rec's: iat.cpu (2 CPUs, 8 GiB)" in proc.stderr


def test_stale_install_says_how_to_register(monkeypatch):
    """iat-rec's names missing from the installed entry points: the error says to reinstall."""
    monkeypatch.setattr(resources, "load_group", lambda group, default=None: default)
    with pytest.raises(ValueError, match=r"not registered with torchx.*pip install --no-deps -e \."):
        iat.compress(data="LOG", out="RUN")


@pytest.mark.parametrize("name", list(MODULES))
def test_more_ranks_per_node_than_gpus_is_refused(name):
    with pytest.raises(ValueError, match=r"-j 2x8 starts 8 ranks per node, but -h iat.gpu.4 gives each node 4 GPUs"):
        getattr(iat, name)(j="2x8", h="iat.gpu.4", **FULL_ARGS[name])
    # fewer ranks than GPUs, or any number of CPU ranks, is allowed
    assert getattr(iat, name)(j="1x2", h="iat.gpu.4", **FULL_ARGS[name]).roles[0].resource.gpu == 4
    assert getattr(iat, name)(j="1x8", h="iat.cpu", **FULL_ARGS[name]).roles[0].resource.gpu == 0


# ---- dry runs of a 2x8 GPU job -------------------------------------------------------------------


def check_2x8_torchrun(cmd: str, module: str = "pipelines.compress") -> list[str]:
    argv = shlex.split(cmd)
    assert argv[0] == "torchrun"
    args = torchrun_parser().parse_args(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.module, args.training_script) == ("2", "8", True, module)
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint.endswith(":29500")
    return args.training_script_args


def test_slurm_dryrun_2x8_gpu():
    out = torchx(
        *"run --dryrun -s slurm -cfg partition=gpu,time=60".split(),
        f"{COMPONENT}:compress",
        *"-j 2x8 -h iat.gpu.8 --data /shared/log --out /shared/run".split(),
        *"--scheme user --steps 1000 -- --emb-dim 32".split(),
    ).stdout
    script = out.split("# SBATCH_SCRIPT")[1]
    # one heterogeneous group per node, each one task with the node's 8 GPUs, 88 CPUs and 512 GiB
    groups = [line.split()[1:] for line in script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert len(groups) == 2
    node = resources.iat_gpu_8()
    assert (node.cpu, node.gpu, node.memMB) == (88, 8, 512 * 1024)
    for i, group in enumerate(groups):
        assert f"--job-name=compress-{i}" in group
        for opt in (
            "--ntasks-per-node=1",
            "--gpus-per-task=8",
            "--cpus-per-task=88",
            f"--mem={node.memMB}",
            "--partition=gpu",
            "--time=60",
        ):
            assert opt in group
    srun = script.split("\nsrun ", 1)[1].split("\nexitcode=", 1)[0].replace(":\\\n", " : ")
    tokens = shlex.split(srun)
    commands = [tokens[i + 2] for i, t in enumerate(tokens) if t == "bash" and tokens[i + 1] == "-c"]
    assert len(commands) == 2
    for cmd in commands:
        program = check_2x8_torchrun(cmd)
        assert program == [
            *"--data /shared/log --out /shared/run --scheme user".split(),
            *"--steps 1000 --emb-dim 32".split(),
        ]


def test_kubernetes_dryrun_2x8_gpu():
    pytest.importorskip(
        "kubernetes", reason="torchx's kubernetes scheduler needs the kubernetes client (pip install kubernetes)"
    )
    out = torchx(
        "run",
        "--dryrun",
        "--workspace",
        "",
        "-s",
        "kubernetes",
        "-cfg",
        "queue=iat,namespace=ml",
        f"{COMPONENT}:compress",
        *"-j 2x8 -h iat.gpu.8 --image".split(),
        *"registry.example.com/iat-rec:1 --data /data/log --out".split(),
        *"/data/run --mounts type=volume,src=iat-data,dst=/data".split(),
    ).stdout
    job = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert (job["kind"], job["spec"]["queue"], job["spec"]["schedulerName"]) == ("Job", "iat", "volcano")
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)  # one pod per node
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.com/iat-rec:1"
        limits = container["resources"]["limits"]
        assert (limits["nvidia.com/gpu"], limits["cpu"], limits["memory"]) == ("8", "88000m", f"{512 * 1024}M")
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert {"mountPath": "/data", "name": "mount-0"} in [
            {k: m[k] for k in ("mountPath", "name")} for m in container["volumeMounts"]
        ]
        assert container["command"][:2] == ["bash", "-c"]
        assert check_2x8_torchrun(container["command"][2]) == [*"--data /data/log --out /data/run".split()]


# ---- docker/Dockerfile and .dockerignore ----------------------------------------------------------

DOCKERFILE = REPO / "docker" / "Dockerfile"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def dockerfile_runs(text: str, variant: str) -> list[str]:
    """The RUN commands of the stages that the image of ``--build-arg VARIANT=<variant>`` is built
    from, in build order: instructions joined across backslash-newlines, ARG defaults and the
    build arg substituted in FROM, the final stage followed through ``FROM <stage>`` to its base."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # a comment, also between continuation lines
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = (pending + raw).strip(), ""
        if line:
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    args, stages, current = {}, {}, None
    for keyword, rest in instructions:
        if keyword == "ARG" and current is None:
            key, _, default = rest.partition("=")
            args[key] = default
        elif keyword == "FROM":
            args["VARIANT"] = variant
            parts = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            current = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages[current] = (parts[0], [])
        elif keyword == "RUN":
            stages[current][1].append(rest)
    chain, stage = [], current
    while stage in stages:
        chain.insert(0, stage)
        stage = stages[stage][0]
    return [cmd for stage in chain for cmd in stages[stage][1]]


def pip_installs(commands: list[str]) -> tuple[list[list[str]], list[str]]:
    """Each ``pip install`` of the shell commands (``&&`` chains split), without -q, and the
    index URLs they name."""
    installs, indexes = [], []
    for command in commands:
        for part in command.split("&&"):
            argv = shlex.split(part)
            if len(argv) < 2 or posixpath.basename(argv[0]) != "pip" or argv[1] != "install":
                continue
            args, rest = [], iter(argv[2:])
            for arg in rest:
                if arg in ("--index-url", "--extra-index-url"):
                    indexes.append(next(rest))
                elif arg != "-q":
                    args.append(arg)
            installs.append(args)
    return installs, indexes


@pytest.mark.parametrize("variant, has_gpu", [("cpu", ""), ("cuda", "1")])
def test_dockerfile_installs_what_the_makefile_installs(variant, has_gpu):
    """Every pip install of the image, in order, with the Makefile's pins and flags (as make
    expands them: ``make -n``), for the CPU and the CUDA Makefile branches."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "-n", "-B", "install", f"HAS_GPU={has_gpu}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    make_installs, make_indexes = pip_installs([line for line in dry.splitlines() if "/pip install " in line])
    docker_installs, docker_indexes = pip_installs(dockerfile_runs(DOCKERFILE.read_text(), variant))
    fbgemm = "fbgemm-gpu==1.8.0" if has_gpu else "fbgemm-gpu-cpu==1.8.0"
    assert ["torch==2.13.0", fbgemm] in make_installs and len(make_installs) == 6  # the recipe as known
    assert docker_installs == make_installs
    assert make_indexes == []
    # the one difference: the CPU image takes torch's CPU build (same version) from PyTorch's index
    assert docker_indexes == ([CPU_TORCH_INDEX] if variant == "cpu" else [])


def test_dockerfile_installs_this_repo_in_its_workdir():
    text = DOCKERFILE.read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^WORKDIR /workspace$", final_stage, re.M) and re.search(r"^COPY \. \.$", final_stage, re.M)
    assert final_stage.index("COPY . .") < final_stage.index("pip install -q --no-deps -e .")
    assert "python -m pipelines.compress --help" in final_stage  # the build fails if the module does not run
    assert re.search(r"^FROM torch-\$\{VARIANT\} ", final_stage, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)


def test_dockerignore_keeps_data_runs_and_environments_out():
    """What torchx's own image build copies (it reads .dockerignore); docker matches these plain
    names at the context root the same way."""
    import fsspec
    from torchx.workspace.api import walk_workspace

    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".gpu", "runs", "data", ".git"} <= patterns
    kept = set()
    for folder, _, files in walk_workspace(fsspec.filesystem("file"), str(REPO), ".dockerignore"):
        rel = os.path.relpath(folder, REPO)
        kept |= {os.path.normpath(os.path.join(rel, f)) for f in files}
    assert not {p.split(os.sep)[0] for p in kept} & {".venv", ".git", ".gpu", ".mldata", "runs", "data"}
    assert not [p for p in kept if "__pycache__" in p.split(os.sep) or p.endswith(".pyc") or ".egg-info" in p]
    needed = {
        "setup.py",
        "iat_rec/__init__.py",
        "pipelines/compress.py",
        "torchx_components/iat.py",
        "torchx_components/resources.py",
    }
    assert needed <= kept


# ---- a real local run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_local_cwd_run_pipeline_2_ranks(tmp_path):
    """``torchx run -s local_cwd ...:pipeline -j 1x2``: every stage on two gloo ranks under torchrun."""
    log, work = tmp_path / "log", tmp_path / "work"
    synth_log(log, users=100, mean_instances=30, seed=0)
    (tmp_path / "c1.yaml").write_text("steps: 3\nbatch_size: 64\nwindow: 8\neval_batches: 2\nprogress: false\n")
    (tmp_path / "c2.yaml").write_text(
        "steps: 3\nbatch_size: 32\neval_batches: 2\nprogress: false\nranker: {max_len: 16}\n"
    )
    torchx(
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'torchx_logs'}",
        f"{COMPONENT}:pipeline",
        "-j",
        "1x2",
        "--data",
        str(log),
        "--work",
        str(work),
        *"--scheme user --history iat --compress_config".split(),
        str(tmp_path / "c1.yaml"),
        "--rank_config",
        str(tmp_path / "c2.yaml"),
        timeout=300,
    )
    run = work / "stage1-user-s0"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_00000003" and (ckpt / ".metadata").is_file()
    assert {p.name for p in ckpt.glob("rank*.json")} == {"rank0.json", "rank1.json"}
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    manifest = json.loads((work / "tokens-user-time-consistent-s0" / "manifest.json").read_text())
    assert manifest["scheme"] == "user" and manifest["tokens_from"] == "time-consistent"
    metrics = json.loads((work / "rank-iat-user-transformer-s0" / "metrics.json").read_text())
    assert metrics["n"] == len(time_split(InstanceLog(log))["test"])  # every test request scored
