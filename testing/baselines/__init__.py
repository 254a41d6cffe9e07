"""Anchors that our all-reduce is measured against in the same run (docs/architecture.md §Measuring performance).

    from testing.baselines.gloo_allreduce import run_gloo          # torch.distributed gloo, fp32
    from testing.baselines.hivemind_allreduce import run_hivemind  # hivemind DecentralizedAverager

Both take a ``testing.links.Links`` (open) and return a JSON-able dict of medians and raw samples.
At top level these modules import only the standard library and stdlib-only testing modules
(links, netns, netem, samples): the hivemind workers run them under bench/.venv-hivemind (numpy<2, no project dependencies), not the project's environment.
"""
