"""
EMUFormer (paper Section 3.3): distil a Deep Ensemble of SegDepthFormers into one SegDepthFormer
that predicts the ensemble's uncertainty at the cost of a single network.

Two steps. First train the teacher, N SegDepthFormers from different seeds (train.py). Then
train the student, a SegDepthFormer initialised from a trained one, on the ground truth AND on
the teacher's predictive uncertainty, with Eq. 11:

    L = CE + w1 GNLL + w2 KL(q || p) + w3 RMSLE(sigma^2, s^2),     w1 = w3 = 1, w2 = 10

This file holds what is EMUFormer's own, in the order a step uses it:

    build_teacher       the N members, frozen, in eval mode, run as one model (uq.DeepEnsemble)
    teacher_targets     for a batch, the teacher's mean softmax q (kept as log q for Eq. 8) and
                        its predictive variance sigma^2 (Eq. 10), from one pass of all members
                        on the colour-jittered image, without gradients
    distillation_loss   Eq. 11 on the student's output (losses.emuformer_loss)

The teacher sees a colour-jittered copy of the student's image (data.py draws it with the same
crop, scale and flip): on its own training images a Deep Ensemble is over-confident, and the
jitter makes its uncertainty there look more like that on unseen images, so the student does
not learn to under-estimate it (Section 3.3). How strong a jitter is right depends on the data:
--jitter sets it. (On the synthetic scenes, whose classes are told apart mostly by colour, the
default hue and saturation jitter makes the teacher far less sure and its student
under-confident; the demo uses a milder one.)

Everything else (data, schedule, AMP, DDP, checkpoints, --resume) is train.py's loop, given
distillation_loss as its objective; 100 epochs by default on every data set. The student's
architecture is read from --student-init (else from the teacher's checkpoints): --backbone is
needed only to ask for another student, e.g. a B0 student of a B2 teacher without an init.

    python distill.py --teacher runs/sdf_b2_seed{0..9}/best.pt --student-init runs/sdf_b2_seed0/best.pt \\
        --data nyuv2 --root data/nyuv2 --out runs/emuformer_b2
    torchrun --nproc_per_node=4 distill.py ... (the same flags)
    # the CPU demo, after three demo members of train.py (see README.md)
    python distill.py --teacher runs/demo{0,1,2}/best.pt --student-init runs/demo0/best.pt \\
        --data synthetic --epochs 30 --lr 6e-4 --jitter 0.2 0.2 0.2 0.02 --out runs/demo_emu
"""

from functools import partial

import torch

import data
import heads
import losses
import plumbing
import train
import uq


def get_parser():
    p = train.get_parser()
    p.description = __doc__
    p.add_argument('--teacher', nargs='+', required=True, help="the Deep Ensemble members' checkpoints")
    p.add_argument('--student-init', help='a trained SegDepthFormer to start from (the paper does); '
                                          'its architecture is the student\'s')
    p.add_argument('--w2', type=float, default=losses.W2, help='weight of the KL term (Eq. 11)')
    p.add_argument('--w3', type=float, default=losses.W3, help='weight of the RMSLE term (Eq. 11)')
    p.add_argument('--jitter', type=float, nargs=4, default=data.TEACHER_JITTER,
                   metavar=('BRIGHTNESS', 'CONTRAST', 'SATURATION', 'HUE'),
                   help="strengths of the colour jitter of the teacher's input (the paper gives none)")
    p.set_defaults(epochs=100, out='runs/emuformer', backbone=None)
    return p


def build_teacher(paths, num_classes, device):
    """The Deep Ensemble teacher: SegDepthFormers of one architecture, frozen (eval mode, no
    gradients), their weights stacked once to run as one model."""
    members = heads.load_members(paths)
    if set(members[0].tasks) != {'seg', 'depth'} or members[0].num_classes != num_classes:
        raise ValueError(f'the teacher must be SegDepthFormers with {num_classes} classes; '
                         f'{paths[0]} is {heads.describe(members[0])}')
    return uq.DeepEnsemble([m.to(device) for m in members])


def teacher_targets(teacher, image_teacher):
    """The teacher's targets for a batch: log q, the log of its mean softmax (Eq. 8), and
    sigma^2, its predictive variance (Eq. 10), both (B, ...) at the input size."""
    pred = uq.predict(teacher, image_teacher, 'de')
    return pred.log_probs, pred.depth_var


def distillation_loss(out, batch, teacher, w1, w2, w3, depth_loss, across_ranks):
    """The objective of this script: Eq. 11, the student's output against the batch's ground
    truth and the teacher's targets on the jittered image."""
    log_q, sigma2 = teacher_targets(teacher, batch['image_teacher'])
    return losses.emuformer_loss(out, batch['label'], batch['depth'], log_q, sigma2, w1, w2, w3,
                                 depth_loss, across_ranks=across_ranks)


def student_backbone(args, teacher):
    """The student's backbone: --student-init's, else the teacher's; --backbone may only agree
    with an init (or choose the student of a teacher without one)."""
    if args.student_init:
        config = plumbing.load_file(args.student_init).get('config', {})
        if config.get('name') != 'segdepthformer':
            raise ValueError(f"--student-init {args.student_init} is not a SegDepthFormer checkpoint of "
                             f"train.py (its config: {config or 'none'})")
        if args.backbone not in (None, config['backbone']):
            raise ValueError(f"--backbone {args.backbone} conflicts with --student-init {args.student_init}, "
                             f"a {config['backbone']} SegDepthFormer; leave --backbone out")
        return config['backbone']
    return args.backbone or teacher.members[0].config['backbone']


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.model != 'segdepthformer':
        raise ValueError(f'the EMUFormer student is a SegDepthFormer, not a {args.model}')
    train.check_args(args)
    with plumbing.process_group(torch.device(args.device)) as (rank, world_size, device):
        run = train.setup(args, rank, world_size, device)
        teacher = build_teacher(args.teacher, data.NUM_CLASSES[args.data], run.device)
        args.backbone, args.init = student_backbone(args, teacher), args.student_init or args.init
        loss_fn = partial(distillation_loss, teacher=teacher, w1=args.w1, w2=args.w2, w3=args.w3,
                          depth_loss=args.depth_loss, across_ranks=run.ddp)
        return train.train(args, run, loss_fn, meta=data.describe(args.data, objective='eq11'),
                           teacher_jitter=tuple(args.jitter))


if __name__ == '__main__':
    plumbing.entry_point(main)
