"""The retrieval prior's choices, without drawing a picture: for the free-form prompts with an intended emoji
(`paella_openmoji.freeform.FREEFORM`) and the held-out paraphrases (`paella_openmoji.PARAPHRASES`), how
often the intended emoji is the caption the prior ranks first (what it draws at temperature 0) and among
its first five, for variants of the prior built from one training folder:

- keys: the names alone, or the names and every other caption of the folder (the short names);
- a target's score: the maximum over its keys, or the soft maximum `paella.captions` uses;
- misspelt words tried as the nearest caption word, or not.

    python benchmarks/caption_prior.py --data runs/openmoji64a

Prints one JSON line per variant; the last is the shipped prior's rule (all keys, soft maximum, spelling).
``--misses``: instead, each free-form prompt whose intended emoji that rule does not rank first.
"""
import argparse
import json
import os

import torch


def ranks(scores, targets):
    """(N,) rank of each row's target (0: first), ties counted against it."""
    own = scores[torch.arange(len(targets)), targets][:, None]
    return (scores > own).sum(1) + (scores == own).sum(1) - 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', required=True, help="the generator's training folder (`paella data openmoji --aliases`)")
    p.add_argument('--misses', action='store_true',
                   help="instead: the free-form prompts whose intended emoji the shipped rule does not rank first")
    args = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from paella.captions import Captions, folder_pairs
    from paella.conditioning import minilm_encoder
    from paella_openmoji import PARAPHRASES
    from paella_openmoji.freeform import FREEFORM
    encoder = minilm_encoder()
    pairs = folder_pairs(args.data)
    sets = {'names': Captions.build(encoder, [(t, t) for t in dict.fromkeys(t for _, t in pairs)]),
            'names+short names': Captions.build(encoder, pairs)}
    if args.misses:
        captions = sets['names+short names']
        index = {t: i for i, t in enumerate(captions.targets)}
        rows = [(q, t) for q, t in FREEFORM if t in index]
        scores = captions.similarity(encoder, [q for q, _ in rows])
        for (q, t), s, r in zip(rows, scores, ranks(scores, torch.tensor([index[t] for _, t in rows])).tolist()):
            if r:
                print(json.dumps({'prompt': q, 'intended': t, 'rank': r,
                                  'first': [captions.targets[j] for j in s.topk(3).indices.tolist()]}))
        return
    for keys, captions in sets.items():
        index = {t: i for i, t in enumerate(captions.targets)}
        asked = {'freeform': [(q, t) for q, t in FREEFORM if t in index],
                 'paraphrases': [(q, t) for q, t in PARAPHRASES if t in index]}
        for soft in (False, True):
            for spelling in (False, True):
                row = {'keys': keys, 'score': 'soft maximum' if soft else 'maximum', 'spelling': spelling}
                for name, rows in asked.items():
                    r = ranks(captions.similarity(encoder, [q for q, _ in rows], soft, spelling),
                              torch.tensor([index[t] for _, t in rows]))
                    row |= {f'{name}_top1': round(float((r == 0).float().mean()), 4),
                            f'{name}_top5': round(float((r < 5).float().mean()), 4), f'{name}_n': len(rows)}
                print(json.dumps(row), flush=True)


if __name__ == '__main__':
    main()
