"""
EMUFormer (paper Section 3.3): distil a Deep Ensemble of SegDepthFormers into one SegDepthFormer
that predicts the ensemble's uncertainty at the cost of a single network.

Two steps. First train the teacher, N SegDepthFormers from different seeds (train.py). Then
train the student, a SegDepthFormer initialised from a trained one, on the ground truth AND on
the teacher's predictive uncertainty, with Eq. 11:

    L = CE + w1 GNLL + w2 KL(q || p) + w3 RMSLE(sigma^2, s^2),     w1 = w3 = 1, w2 = 10

This file holds what is EMUFormer's own, in the order a step uses it:

    build_teacher       the N members, frozen, in eval mode, run as one model (uq.DeepEnsemble:
                        all members in one batched pass on a GPU, one after the other on a CPU)
    teacher_targets     for a batch, the teacher's mean softmax q (kept as log q for Eq. 8) and
                        its predictive variance sigma^2 (Eq. 10) on the colour-jittered image
    emuformer_step      one step: the teacher's targets without gradients, the student's
                        forward pass, Eq. 11 (losses.emuformer_loss), backward, AdamW

The teacher sees a colour-jittered copy of the student's image (data.py draws it with the same
crop, scale and flip): on its own training images a Deep Ensemble is over-confident, and the
jitter makes its uncertainty there look more like that on unseen images, so the student does
not learn to under-estimate it (Section 3.3). How strong a jitter is right depends on the data:
--jitter sets it. (On the synthetic scenes, whose classes are told apart mostly by colour,
data.TEACHER_JITTER makes the teacher far less sure and its student under-confident; their
recipe has a milder one.)

Everything else (data, schedule, AMP, DDP, checkpoints, --resume) is train.py's Loop. The
recipes (RECIPES) follow the data set like train.py's. The student's architecture is read from
--student-init (else from the teacher's checkpoints): --backbone is needed only to ask for
another student, e.g. a B0 student of a B2 teacher without an init. The checkpoints record the
teacher's identity, a digest of each member's weights, and --resume refuses another teacher.

    # no arguments: the whole method on the synthetic scenes, on a CPU (demo.py --stage emuformer):
    # the members it does not find, the student, and the three evaluations side by side
    python distill.py
    python distill.py --teacher runs/sdf_b2_seed{0..9}/best.pt --student-init runs/sdf_b2_seed0/best.pt \\
        --data nyuv2 --root data/nyuv2 --out runs/emuformer_b2
    torchrun --nproc_per_node=4 distill.py ... (the same flags)
"""

import hashlib

import sys

import torch

import data
import demo
import heads
import losses
import plumbing
import train
import uq

# the distillation recipes (the paper trains the student 100 epochs on either data set)
RECIPES = {'synthetic': {'lr': 6e-4, 'epochs': 16, 'jitter': (0.2, 0.2, 0.2, 0.02)},
           'nyuv2': {'lr': 6e-5, 'epochs': 100, 'jitter': data.TEACHER_JITTER},
           'cityscapes': {'lr': 6e-5, 'epochs': 100, 'jitter': data.TEACHER_JITTER}}


def get_parser():
    p = train.get_parser()
    p.description = __doc__
    p.add_argument('--teacher', nargs='+', help="the Deep Ensemble members' checkpoints (two or more)")
    p.add_argument('--student-init', help='a trained SegDepthFormer to start from (the paper does); '
                                          'its architecture is the student\'s')
    p.add_argument('--w2', type=plumbing.non_negative_float, default=losses.W2, help='weight of the KL term (Eq. 11)')
    p.add_argument('--w3', type=plumbing.non_negative_float, default=losses.W3, help='weight of the RMSLE term (Eq. 11)')
    p.add_argument('--jitter', type=plumbing.non_negative_float, nargs=4, metavar=('BRIGHTNESS', 'CONTRAST', 'SATURATION', 'HUE'),
                   help="strengths of the colour jitter of the teacher's input (the paper gives none; "
                        "default: the data set's recipe)")
    p.set_defaults(out='runs/emuformer')
    return p


def weights_digest(model):
    """SHA-256 of a model's weights (names, then bytes): who a teacher member is."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_teacher(paths, num_classes, device):
    """The Deep Ensemble teacher: two or more SegDepthFormers of one architecture, frozen (eval
    mode, no gradients), their weights stacked once to run as one model -> (teacher, the
    digest of each member's weights)."""
    members = heads.load_members(paths)
    for path, member in zip(paths, members):
        if member.config['name'] != 'segdepthformer' or member.num_classes != num_classes:
            raise ValueError(f'the teacher must be SegDepthFormers with {num_classes} classes; '
                             f'{path} is {heads.describe(member)}')
    if len(members) < 2:
        raise ValueError(f'--teacher {paths[0]}: a Deep Ensemble teacher needs the checkpoints of two or more '
                         f'SegDepthFormers trained with different --seed')
    return uq.DeepEnsemble([m.to(device) for m in members]), [weights_digest(m) for m in members]


def teacher_targets(teacher, image_teacher):
    """The teacher's targets for a batch: log q, the log of its mean softmax (Eq. 8), and
    sigma^2, its predictive variance (Eq. 10), both (B, ...) at the input size."""
    pred = uq.predict(teacher, image_teacher, 'de')
    return pred.log_probs, pred.depth_var


def emuformer_step(student, teacher, batch, optimizer, scaler, args, proc):
    """One EMUFormer step: the teacher's targets on the jittered image (no gradients), then the
    student on the plain image, then Eq. 11 against the ground truth and the targets, under
    autocast (forward and loss only); backward, AdamW. Returns the loss and its terms."""
    batch = train.to_device(batch, proc.device)
    with plumbing.autocast(proc.device, proc.amp_dtype):
        with torch.no_grad():
            log_q, sigma2 = teacher_targets(teacher, batch['image_teacher'])
        out = student(batch['image'])
        loss, terms = losses.emuformer_loss(out, batch['label'], batch['depth'], log_q, sigma2, args.w1, args.w2,
                                            args.w3, args.depth_loss, across_ranks=proc.ddp)
    train.optimize(loss, optimizer, scaler)
    return {'loss': loss, **terms}


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


def distill(args, proc, command):
    """Train the student with Eq. 11 (emuformer_step) -> the student, unwrapped."""
    teacher, digests = build_teacher(args.teacher, data.NUM_CLASSES[args.data], proc.device)
    args.backbone, args.init = student_backbone(args, teacher), args.student_init or args.init
    meta = data.checkpoint_meta(args.data, objective='eq11', teacher=digests)
    loop = train.Loop(args, proc, train.training_set(args, teacher_jitter=tuple(args.jitter)), meta, command)
    with loop:
        for batch in loop.batches():
            loop.step_done(emuformer_step(loop.wrapped, teacher, batch, loop.optimizer, loop.scaler, args, proc))
    loop.summary()
    return loop.model  # the DDP wrapper goes with this frame, before the process group


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the whole method on the synthetic scenes, each step its own command
        return demo.main(['--stage', 'emuformer'], script='distill.py')
    args = get_parser().parse_args(argv)
    if not args.teacher:
        raise ValueError("--teacher is needed: the Deep Ensemble members' checkpoints (train.py runs with "
                         "different --seed); with no arguments at all, distill.py runs the synthetic demo")
    if args.model != 'segdepthformer':
        raise ValueError(f'the EMUFormer student is a SegDepthFormer, not a {args.model}')
    train.apply_recipe(args, RECIPES[args.data])
    train.check_args(args)
    with train.run_directory(args), plumbing.process_group(torch.device(args.device)) as (rank, world_size, device):
        return distill(args, train.this_process(args, rank, world_size, device), train.command_line('distill.py', argv))


if __name__ == '__main__':
    plumbing.entry_point(main)
