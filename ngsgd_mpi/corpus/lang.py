"""``OUT_DIR/lang``: what a decoding graph needs to know about a corpus.

``ngsgd-mkgraph`` (:mod:`ngsgd_mpi.graph`) builds its graphs from these files;
they are Kaldi's ``data/local/dict`` plus the structure of the acoustic model
that the frame labels imply:

* ``lexiconp.txt``: ``WORD prob PH1 PH2 ...``, pronunciations as espeak spoke
  them in training (:mod:`.lexicon`); ``silence_phones.txt``,
  ``optional_silence.txt`` (``sil``), ``nonsilence_phones.txt``.
* ``phones.txt``: Kaldi phone ids (``<eps> 0``, ``sil 1``, ``AA 2``, ...), the
  same table as in the data directories.
* ``topo``: Kaldi's text HMM topology for the label kind: one emitting state
  per phone for ``phone`` labels, three left-to-right states (pdf classes
  0, 1, 2) for ``phone-state`` and ``triphone``; initial probabilities 0.75
  (self-loop) / 0.25, as Kaldi's prepare_lang writes them.
* ``pdf_map.txt``: the context dependency ("tree"), one line per class
  (= pdf-id = network output): ``class left phone right pdf_class``, where
  ``*`` matches any neighbour.  A context window takes the line with its exact
  neighbours if there is one, else the ``* phone *`` line; utterance edges count
  as ``sil`` (:mod:`.labels`).
"""

from __future__ import annotations

import os

from ngsgd_mpi.corpus.labels import NUM_STATES, LabelSet
from ngsgd_mpi.corpus.lexicon import write_lexiconp
from ngsgd_mpi.corpus.phones import PHONES, SILENCE


def topology_text(label_kind: str) -> str:
    """Kaldi text topology covering every phone (ids 1..40)."""
    num_states = 1 if label_kind == "phone" else NUM_STATES
    states = [f"<State> {s} <PdfClass> {s} <Transition> {s} 0.75 <Transition> {s + 1} 0.25 </State>"
              for s in range(num_states)]
    phone_ids = " ".join(str(i + 1) for i in range(len(PHONES)))
    return "\n".join(["<Topology>", "<TopologyEntry>", "<ForPhones>", phone_ids, "</ForPhones>", *states,
                      f"<State> {num_states} </State>", "</TopologyEntry>", "</Topology>"]) + "\n"


def pdf_map_lines(label_set: LabelSet) -> list[str]:
    """``class left phone right pdf_class`` for every class of the label set."""
    if label_set.kind == "phone":
        return [f"{i} * {name} * 0" for i, name in enumerate(PHONES)]
    lines = [f"{NUM_STATES * p + s} * {name} * {s}" for p, name in enumerate(PHONES) for s in range(NUM_STATES)]
    for (left, phone, right, state), cls in sorted(label_set.triphones.items(), key=lambda kv: kv[1]):
        lines.append(f"{cls} {PHONES[left]} {PHONES[phone]} {PHONES[right]} {state}")
    return lines


def write_lang(lang_dir: str, label_set: LabelSet, lexicon_entries) -> None:
    os.makedirs(lang_dir, exist_ok=True)

    def write_lines(name, lines):
        with open(os.path.join(lang_dir, name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    write_lexiconp(os.path.join(lang_dir, "lexiconp.txt"), lexicon_entries)
    write_lines("phones.txt", ["<eps> 0"] + [f"{p} {i + 1}" for i, p in enumerate(PHONES)])
    write_lines("silence_phones.txt", [PHONES[SILENCE]])
    write_lines("optional_silence.txt", [PHONES[SILENCE]])
    write_lines("nonsilence_phones.txt", [p for i, p in enumerate(PHONES) if i != SILENCE])
    write_lines("pdf_map.txt", pdf_map_lines(label_set))
    with open(os.path.join(lang_dir, "topo"), "w", encoding="utf-8") as f:
        f.write(topology_text(label_set.kind))
