"""Only the package list lives here; everything else is in pyproject.toml.

kernels/ is a top-level folder of the repository (docs/ARCHITECTURE.md, Modules) that installs as
megammr.kernels. setuptools' packages.find cannot rename a folder, so the mapping is
built here; megammr/__init__.py resolves the same mapping for a source checkout.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["megammr", "megammr.*"])
kernel_packages = ["megammr.kernels" + ("." + p if p else "") for p in [""] + find_packages("kernels")]
package_dir = {"megammr": "megammr"}
package_dir.update({p: "kernels/" + p[len("megammr.kernels."):].replace(".", "/") if p != "megammr.kernels" else "kernels"
                    for p in kernel_packages})

setup(packages=packages + kernel_packages, package_dir=package_dir)
