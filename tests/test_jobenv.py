"""kvframe.jobenv: one reader of a job's variables for every multi-process store."""

import pytest

from kvframe import jobenv


def test_the_secret_is_kvframe_secret_and_the_old_nccl_name_still_works():
    assert jobenv.job_secret({}) is None
    assert jobenv.job_secret({"KVFRAME_SECRET": "s1", "KVFRAME_NCCL_TOKEN": "old"}) == "s1"
    with pytest.warns(DeprecationWarning, match="KVFRAME_NCCL_TOKEN is now KVFRAME_SECRET"):
        assert jobenv.job_secret({"KVFRAME_NCCL_TOKEN": "old"}) == "old"


def test_root_address_kvframe_then_torchrun_then_dmlc():
    assert jobenv.root_address({}) is None
    assert jobenv.root_address({"DMLC_PS_ROOT_URI": "d", "DMLC_PS_ROOT_PORT": "1"}) == ("d", 1, "DMLC_PS_ROOT_PORT")
    both = {"DMLC_PS_ROOT_URI": "d", "DMLC_PS_ROOT_PORT": "1", "MASTER_ADDR": "m", "MASTER_PORT": "2"}
    assert jobenv.root_address(both) == ("m", 2, "MASTER_PORT")
    assert jobenv.root_address({**both, "KVFRAME_ROOT_URI": "k", "KVFRAME_ROOT_PORT": "3"}) == ("k", 3,
                                                                                                 "KVFRAME_ROOT_PORT")
    with pytest.raises(jobenv.JobEnvError, match="MASTER_PORT='x' must be an integer"):
        jobenv.root_address({"MASTER_ADDR": "m", "MASTER_PORT": "x"})


def test_mpi_rank_only_when_the_launcher_says_so():
    env = {"OMPI_COMM_WORLD_RANK": "3", "PMI_RANK": "5"}
    assert jobenv.mpi_rank(env) is None
    assert jobenv.mpi_rank({**env, "KVFRAME_RANK_FROM_MPI": "1"}) == 3
    assert jobenv.mpi_rank({"PMI_RANK": "5", "KVFRAME_RANK_FROM_MPI": "1"}) == 5
    assert jobenv.mpi_rank({"PMI_RANK": "5", "KVFRAME_RANK_FROM_MPI": "0"}) is None


def test_worker_rank_errors_name_the_variables():
    with pytest.raises(jobenv.JobEnvError, match="KVFRAME_NUM_WORKERS=2 is set but KVFRAME_RANK is not"):
        jobenv.worker_rank({"KVFRAME_NUM_WORKERS": "2"})
    with pytest.raises(jobenv.JobEnvError, match=r"rank must lie in \[0, 2\); torchrun gave rank 2"):
        jobenv.worker_rank({"RANK": "2", "WORLD_SIZE": "2"})
    assert jobenv.worker_rank({"RANK": "1", "WORLD_SIZE": "2", "KVFRAME_LOCAL_RANK": "1"}) == \
        jobenv.WorkerRank(1, 2, 1, "torchrun")


def test_the_dist_stores_read_the_same_secret(monkeypatch):
    env = pytest.importorskip("kvframe_dist.env")
    for k in ("KVFRAME_SECRET", "KVFRAME_NCCL_TOKEN", "KVFRAME_INSECURE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DMLC_PS_ROOT_PORT", "9000")
    monkeypatch.setenv("DMLC_NUM_SERVER", "1")
    monkeypatch.setenv("DMLC_NUM_WORKER", "1")
    monkeypatch.setenv("KVFRAME_SECRET", "one-secret")
    assert env.node_env("worker").secret == b"one-secret"
