"""Scale-out: the animation engine on Ray Serve (`iwarp serve --engine ray`).

`deployment` is the replica side (the runtime's Animator as a Serve deployment, avatars
multiplexed by id, frames batched across sessions); `engine` is the edge side (the engine a
server's sessions use, with failover between replicas). Needs the `cluster` extra
(`pip install -e '.[cluster]'`); nothing else in iwarp imports this package but the server's
start-up, and only for `--engine ray`. See docs/SCALING.md.
"""
