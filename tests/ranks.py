"""train.py under torchrun, for tests/test_train.py: `fail` makes rank 1 stop with a user's
error at its third step; `threads` prints the threads left once train.py has returned."""

import os
import sys

import plumbing
import train


def failing_step(*args, **kwargs):
    failing_step.calls += 1
    if os.environ['RANK'] == '1' and failing_step.calls == 3:
        raise ValueError('rank 1 stops at its third step')
    return train_step(*args, **kwargs)


failing_step.calls = 0
train_step = train.train_step

if __name__ == '__main__':
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == 'fail':
        train.train_step = failing_step
        plumbing.entry_point(lambda: train.main(argv))
    train.main(argv)
    names = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))
    print(f"rank {os.environ['RANK']} threads after train.main: {' '.join(names)}", flush=True)
