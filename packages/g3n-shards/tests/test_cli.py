import json

from g3n_shards.cli import main


def test_inspect_ls_verify(volumes_set, capsys):
    assert main(["inspect", str(volumes_set)]) == 0
    out = capsys.readouterr().out
    assert "volumes v1.0" in out and "10 samples" in out and "diagnosis" in out and "AD: 3" in out
    assert main(["inspect", "--json", str(volumes_set)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["labels"]["sex"] == {"F": 5, "M": 5} and s["numeric"]["age"]["n"] == 10
    assert main(["ls", str(volumes_set)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert main(["ls", "--samples", "--where", "diagnosis=AD", str(volumes_set)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["verify", "-q", str(volumes_set)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_fails_naming_shard(volumes_set, capsys):
    p = volumes_set / "volumes-000001.tar"
    b = bytearray(p.read_bytes())
    b[-2000] ^= 1
    p.write_bytes(bytes(b))
    assert main(["verify", "-q", str(volumes_set)]) == 1
    assert "volumes-000001.tar" in capsys.readouterr().err


def test_not_a_set(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_merge_and_subset_commands(volumes_set, tmp_path, capsys):
    import g3n_shards as gs

    keys = gs.ShardSet.open(volumes_set).keys()
    (tmp_path / "a.txt").write_text("\n".join(keys[:4]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(keys[4:]))
    assert main(["subset", str(volumes_set), str(tmp_path / "a"), "--keys", str(tmp_path / "a.txt")]) == 0
    assert main(["subset", str(volumes_set), str(tmp_path / "b"), "--keys", str(tmp_path / "b.json")]) == 0
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    assert gs.ShardSet.open(tmp_path / "m").keys() == sorted(keys)
    (tmp_path / "c.txt").write_text("not-a-key\n")
    assert main(["subset", str(volumes_set), str(tmp_path / "c"), "--keys", str(tmp_path / "c.txt")]) == 2
    assert "not in" in capsys.readouterr().err
