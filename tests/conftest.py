"""Test-session environment: CPU-only DeepSpeed, one BLAS thread per process (2-core CI machine)."""

import os

# Entry-point settings (tests are an entry point): child processes inherit them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A local ray.init() under Ray 2.60 turns token auth on and writes ~/.ray/auth_token, which then switches
# every later Ray process of this user to token mode. Tests opt out; the token-auth test sets its own HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller takes one report off each worker per poll, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default; propagated from the driver): the tests' runs report every few 0.1-s steps, so reports queue up and a
# run's end waits ~2 s per queued report (measured: a 24-step 2-worker run took 45-49 s at 2 s, 26-33 s at 0.2-0.25 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402  (after the environment: Ray and DeepSpeed read it at import)


def ensure_local_ray() -> None:
    """A local Ray instance in this process (2 CPUs, no dashboard, no auth token in the real HOME), unless
    one is running. Starting Ray costs ~5 s, so test modules share one; a test that needs its own cluster
    (a token head, a multi-node `ray.cluster_utils.Cluster`) may shut it down: the next module restarts it."""
    import ray

    if ray.is_initialized():
        return
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster the developer happens to run
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    ensure_local_ray()
    yield


@pytest.fixture(scope="session")
def digits_shards(_ray_session, tmp_path_factory):
    """`digits_shards(shard_size)` -> a directory of real digits shards (32x32, train 1497 / val 300), prepared
    once per shard size for the session; tests must not write into it."""
    from lipnext_scale.data.prep import ShardFormat, prepare

    made = {}

    def get(shard_size: int = 1000):
        if shard_size not in made:
            ensure_local_ray()
            out = tmp_path_factory.mktemp(f"digits-{shard_size}")
            prepare("digits", None, str(out), ShardFormat(shard_size=shard_size, image_size=32), progress=False,
                    workers=2)
            made[shard_size] = out
        return made[shard_size]

    return get


# The suite runs under pytest-xdist (pyproject's addopts: `-n 2 --dist loadfile`): test files go to the 2 workers
# whole, in collection order, so the longest start first and the short ones fill in at the end (measured back to
# back on the 2-core machine: 586 s for the whole suite, 715 s in one process with the rehearsal in the
# background). Seconds each file takes alone here:
LONGEST_FIRST = {
    "tests/integration/test_rehearsal.py": 260, "tests/integration/test_train_ray.py": 130,
    "tests/integration/test_validation_training.py": 80, "tests/e2e/test_demo.py": 75,
    "tests/integration/test_certify_job.py": 60, "tests/integration/test_jobs_submit.py": 45,
    "tests/integration/test_validation_ray_api.py": 45, "tests/unit/test_optim_optimizer.py": 35,
    "tests/integration/test_storage_faults.py": 35, "tests/integration/test_serve.py": 30,
    "tests/unit/test_lipschitz_bound.py": 25, "tests/integration/test_data_loader.py": 25,
    "tests/integration/test_sharded_optim.py": 25, "tests/integration/test_train_loop.py": 20,
    "tests/integration/test_bench_gpu_smoke.py": 20,
}


def pytest_collection_modifyitems(config, items):
    """The longest test files first (every xdist worker collects the same order; the scheduler hands out whole
    files in it); within a file, and among the short files, the order stays as collected."""
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.nodeid.split("::")[0], 0))
