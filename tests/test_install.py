"""The installed package imports from outside the repository, under its namespaced names."""
import subprocess
import sys


def test_installed_package_imports_from_outside_the_repository(tmp_path):
    code = ("import internimage.model, internimage.ops, internimage.data, internimage.pretrain; "
            "from internimage.model import create_model, list_models; "
            "print(len(list_models()), create_model('internimage_t', depths=(1, 1, 1, 1)).num_features)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "768"]
