"""The best makespan a world's task graph allows, by simulation: no database, no broker, no worker.

The graph is the worker's: the world description (LLM) spawns the world images (header, then icon, in one
task) and the first character batch; each character batch (LLM) spawns its characters and, in `chained`
mode (the worker's), the next batch; a character spawns its avatar (image) and its post batch (LLM), which
spawns its posts (LLM, one per post), each of which spawns its picture (image). A call takes its latency
plus a per-task overhead (the table's "hop" columns: the time a task spends around its call, claiming,
saving and publishing, during which this model keeps its slot). All workers' slots are pooled, and a free
slot goes at once to the waiting work of highest priority (the worker's order: batches, then posts and
characters, then pictures): real workers can only be slower. The lower bound is `bench/makespan.py`'s
(images x latency / image slots here; the LLM and the critical path do not bind at these sizes).

    python bench/makespan_model.py                      # 25/150, 2 workers of 15/10 slots
    python bench/makespan_model.py --workers 1
    python bench/makespan_model.py --batches parallel   # every character batch at once
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

BATCH = 10
Spawn = Callable[[], None]


@dataclass
class Model:
    users: int
    posts: int
    llm_slots: int
    image_slots: int
    llm_s: float
    image_s: float
    llm_hop: float
    image_hop: float
    parallel_batches: bool

    def run(self) -> tuple[float, int]:
        """(makespan, images made)."""
        ready: dict[str, list[tuple[int, int, Spawn | None]]] = {"llm": [], "image": []}
        busy = {"llm": 0, "image": 0}
        slots = {"llm": self.llm_slots, "image": self.image_slots}
        took = {"llm": self.llm_s + self.llm_hop, "image": self.image_s + self.image_hop}
        running: list[tuple[float, int, str, Spawn | None]] = []
        seq = itertools.count()
        share, extra = divmod(self.posts, self.users)

        def add(pool: str, priority: int, then: Spawn | None = None) -> None:
            heapq.heappush(ready[pool], (priority, next(seq), then))

        def character(i: int) -> None:
            add("image", 3)  # avatar
            posts = share + (1 if i < extra else 0)
            add("llm", 2, lambda: [add("llm", 2, lambda: add("image", 3)) for _ in range(posts)])

        def batch(start: int) -> Spawn:
            def done() -> None:
                end = min(start + BATCH, self.users)
                for i in range(start, end):
                    character(i)
                if not self.parallel_batches and end < self.users:
                    add("llm", 0, batch(end))
            return done

        def description() -> None:
            add("image", 1, lambda: add("image", 1))  # the world's header, then its icon (one task)
            starts = range(0, self.users, BATCH) if self.parallel_batches else [0]
            for start in starts:
                add("llm", 0, batch(start))

        add("llm", 0, description)
        now, images = 0.0, 0
        while True:
            for pool in ("llm", "image"):
                while busy[pool] < slots[pool] and ready[pool]:
                    _, _, then = heapq.heappop(ready[pool])
                    busy[pool] += 1
                    images += pool == "image"
                    heapq.heappush(running, (now + took[pool], next(seq), pool, then))
            if not running:
                return now, images
            now, _, pool, then = heapq.heappop(running)
            busy[pool] -= 1
            if then is not None:
                then()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="25/150", help="USERS/POSTS")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--llm-slots", type=int, default=15, help="per worker")
    parser.add_argument("--image-slots", type=int, default=10, help="per worker")
    parser.add_argument("--llm-latency", type=float, default=1.0)
    parser.add_argument("--image-latency", type=float, default=2.0)
    parser.add_argument("--batches", choices=("chained", "parallel"), default="chained")
    args = parser.parse_args()
    users, posts = (int(x) for x in args.size.split("/"))
    print(f"{users}/{posts}, {args.workers} worker(s) of {args.llm_slots}/{args.image_slots} slots, "
          f"{args.batches} character batches")
    print("llm hop s  image hop s  makespan s  bound s  ratio")
    for llm_hop, image_hop in ((0.0, 0.0), (0.2, 0.0), (0.35, 0.0), (0.35, 0.05)):
        model = Model(users, posts, args.llm_slots * args.workers, args.image_slots * args.workers,
                      args.llm_latency, args.image_latency, llm_hop, image_hop, args.batches == "parallel")
        makespan, images = model.run()
        bound = images * args.image_latency / (args.image_slots * args.workers)
        print(f"{llm_hop:9.2f}  {image_hop:11.2f}  {makespan:10.2f}  {bound:7.2f}  {makespan / bound:5.3f}")


if __name__ == "__main__":
    main()
