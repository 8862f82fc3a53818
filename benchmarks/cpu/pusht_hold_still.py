"""PushT's score floor: the mean score of an agent that never moves, on the `cpu` suite's test episodes.

The score is the episode's best coverage / 0.95, and the T block starts partly over its target, so a policy
that does nothing already scores this much. Read the PushT cells against it, not against 0.

    SDL_VIDEODRIVER=dummy python benchmarks/cpu/pusht_hold_still.py [--seed 100000] [--episodes 50]
"""

import argparse

import numpy as np

from dapolicy.envs import make_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=100_000, help="first env seed (test: 100000, validation: 300000)")
    p.add_argument("--episodes", type=int, default=50)
    args = p.parse_args()
    env = make_env("pusht", 64)
    scores = []
    for seed in range(args.seed, args.seed + args.episodes):
        obs, best = env.reset(seed=seed), 0.0
        for _ in range(env.spec.max_steps):
            obs, result = env.step(np.asarray(obs["proprio"], np.float32))  # the target is where the agent is
            best = max(best, result.score)
            if result.done:
                break
        scores.append(best)
    env.close()
    print(f"hold-still score over env seeds {args.seed}-{args.seed + args.episodes - 1}: mean {np.mean(scores):.3f}, "
          f"successes {sum(s >= 1.0 for s in scores)}/{len(scores)}")


if __name__ == "__main__":
    main()
