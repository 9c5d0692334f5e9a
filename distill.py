"""
EMUFormer (paper Section 3.3): distil a Deep Ensemble of SegDepthFormers into one SegDepthFormer
that predicts the ensemble's uncertainty at the cost of a single network.

Two steps. First train the teacher, N SegDepthFormers from different seeds (train.py). Then
train the student, a SegDepthFormer initialised from a trained one, on the ground truth AND on
the teacher's predictive uncertainty, with Eq. 11:

    L = CE + w1 GNLL + w2 KL(q || p) + w3 RMSLE(sigma^2, s^2),     w1 = w3 = 1, w2 = 10

q is the teacher's mean softmax and sigma^2 its predictive variance (Eq. 10), both from one
batched pass of all members (uq.DeepEnsemble) in eval mode, without gradients. The teacher sees
a colour-jittered copy of the student's image: on its own training images a Deep Ensemble is
over-confident, and the jitter makes its uncertainty there look more like that on unseen images,
so the student does not learn to under-estimate it (Section 3.3). How strong a jitter is right
depends on the data: --jitter sets it. (On the synthetic scenes, whose classes are told apart
mostly by colour, the default hue and saturation jitter makes the teacher far less sure and its
student under-confident; the demo uses a milder one.) Everything else (data,
schedule, AMP, DDP, checkpoints, --resume) is train.py's; 100 epochs by default on every data set.

    python distill.py --teacher runs/sdf_b2_seed{0..9}/best.pt --student-init runs/sdf_b2_seed0/best.pt \
        --data nyuv2 --root data/nyuv2 --backbone b2 --out runs/emuformer_b2
    torchrun --nproc_per_node=4 distill.py ... (the same flags)
    # the CPU demo, after three demo members of train.py (see README.md)
    python distill.py --teacher runs/demo{0,1,2}/best.pt --student-init runs/demo0/best.pt \
        --data synthetic --backbone b0 --epochs 30 --lr 6e-4 --jitter 0.2 0.2 0.2 0.02 --out runs/demo_emu
"""

import data
import train


def get_parser():
    p = train.get_parser()
    p.description = __doc__
    p.add_argument('--teacher', nargs='+', required=True, help="the Deep Ensemble members' checkpoints")
    p.add_argument('--student-init', help='a trained SegDepthFormer to start from (the paper does)')
    p.add_argument('--w2', type=float, default=10.0, help='weight of the KL term (Eq. 11)')
    p.add_argument('--w3', type=float, default=1.0, help='weight of the RMSLE term (Eq. 11)')
    p.add_argument('--jitter', type=float, nargs=4, default=data.TEACHER_JITTER,
                   metavar=('BRIGHTNESS', 'CONTRAST', 'SATURATION', 'HUE'),
                   help="strengths of the colour jitter of the teacher's input (the paper gives none)")
    p.set_defaults(epochs=100, out='runs/emuformer')
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.model != 'segdepthformer':
        raise ValueError(f'the EMUFormer student is a SegDepthFormer, not a {args.model}')
    args.init = args.student_init or args.init
    return train.run(args, teacher=args.teacher, loss_weights=(args.w2, args.w3), jitter=tuple(args.jitter))


if __name__ == '__main__':
    main()
