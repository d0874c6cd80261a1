"""The trainer on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: two raylets,
one GCS), `trainer.nnodes=2 trainer.n_gpus_per_node=1` on CPU.

Run 1 (in-process, so the test can ask the live workers where they run): each rank on a different Ray
node, rank 0's process listening on the TCPStore port, 2 DAPO steps, a checkpoint with both ranks'
shards. Run 2 is the user's launch: `RAY_ADDRESS=<cluster> python -m agentevolver.main_ppo ...`,
resuming that checkpoint for a third step.
"""
from __future__ import annotations

import psutil
import pytest
import ray
from hydra import compose, initialize_config_dir

from agentevolver.main_ppo import CONFIG_DIR, validated
from tests.helpers import cli_env, read_metrics, run_main_ppo, small_overrides

pytestmark = pytest.mark.slow
TWO_NODES = ["trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.device=cpu", "trainer.val_before_train=false",
             "trainer.test_freq=0", "trainer.save_freq=2", "trainer.export_hf=false", "env.pool.num_workers=2"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def listening_pid(port: int) -> int | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return conn.pid
    return None


def test_two_nodes_spread_ranks_train_checkpoint_resume(cluster, tiny_model_dir, gen_data, tmp_path):
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert len(nodes) == 2
    out = tmp_path / "run"
    overrides = small_overrides(tiny_model_dir, gen_data, out) + TWO_NODES
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=overrides + ["trainer.total_training_steps=2"])
    trainer = RayTrainer(validated(cfg))
    try:
        placement = trainer.workers.placement
        print("two-node placement:", [(p["rank"], p["node_id"]) for p in placement],
              "head node:", cluster.head_node.node_id)
        assert [p["rank"] for p in placement] == [0, 1]
        assert {p["node_id"] for p in placement} == set(nodes)  # one rank per node
        addr, port = trainer.workers.master_endpoint
        assert addr == placement[0]["ip"]
        assert listening_pid(port) == placement[0]["pid"]  # the TCPStore server is rank 0's process
        last = trainer.fit()
    finally:
        trainer.shutdown()
    assert "actor/pg_loss" in last
    rows = read_metrics(out)
    assert sorted(rows) == [1, 2] and all("actor/pg_loss" in rows[s] for s in (1, 2))
    ckpt = out / "global_step_2" / "actor"
    assert {p.name for p in ckpt.glob("extra_state_rank*.pt")} == {"extra_state_rank0.pt", "extra_state_rank1.pt"}
    assert {p.name for p in (ckpt / "actor").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    # the user's launch onto the running cluster: RAY_ADDRESS, resume_mode=auto, one more step
    resumed = run_main_ppo(overrides + ["trainer.total_training_steps=3"], timeout=600,
                           env=cli_env(RAY_ADDRESS=cluster.address))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'global_step_2'} at step 2" in resumed.stdout
    lines = [ln for ln in resumed.stdout.splitlines() if ln.startswith("worker_group: rank")]
    print("\n".join(lines))
    assert len(lines) == 2 and {ln.split(" on node ")[1].split()[0] for ln in lines} == set(nodes)
    rows = read_metrics(out)
    assert sorted(rows) == [1, 2, 3] and "actor/pg_loss" in rows[3]
    assert (out / "global_step_3" / "actor" / "extra_state_rank1.pt").is_file()
