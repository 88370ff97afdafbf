"""OUT_DIR/lang of the corpus recipe (ngsgd_mpi/corpus/lang.py)."""

import numpy as np

from ngsgd_mpi.corpus.labels import make_label_set
from ngsgd_mpi.corpus.lang import pdf_map_lines, topology_text, write_lang
from ngsgd_mpi.corpus.phones import PHONES
from ngsgd_mpi.kaldi.model import HmmTopology


def test_topologies_are_kaldi_text():
    one = HmmTopology.from_text(topology_text("phone"))
    three = HmmTopology.from_text(topology_text("phone-state"))
    assert one.phones == three.phones == list(range(1, len(PHONES) + 1))
    assert len(one.entry(1)) == 2 and one.num_pdf_classes(1) == 1
    assert len(three.entry(40)) == 4 and three.num_pdf_classes(40) == 3
    assert three.entry(5)[1].transitions == ((1, 0.75), (2, 0.25))


def test_pdf_map_covers_every_class():
    for kind in ("phone", "phone-state"):
        label_set = make_label_set(kind)
        lines = pdf_map_lines(label_set)
        assert [int(line.split()[0]) for line in lines] == list(range(label_set.num_classes))
    train = [(np.array([0, 5, 9, 5, 0]), np.array([4, 6, 6, 6, 4]))] * 3
    label_set = make_label_set("triphone", train, 200, 1)
    lines = pdf_map_lines(label_set)
    assert sorted(int(line.split()[0]) for line in lines) == list(range(label_set.num_classes))
    assert f"{label_set.triphones[(0, 5, 9, 1)]} sil {PHONES[5]} {PHONES[9]} 1" in lines
    assert "0 * sil * 0" in lines and not any(line.split()[2] == "sil" and "*" not in line for line in lines)


def test_write_lang(tmp_path):
    write_lang(str(tmp_path), make_label_set("phone"), [("CAT", 1.0, ("K", "AE", "T"))])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lexiconp.txt", "nonsilence_phones.txt", "optional_silence.txt", "pdf_map.txt",
                     "phones.txt", "silence_phones.txt", "topo"]
    assert (tmp_path / "lexiconp.txt").read_text() == "CAT 1 K AE T\n"
    assert (tmp_path / "phones.txt").read_text().splitlines()[:2] == ["<eps> 0", "sil 1"]
