"""Adds the plugin's configs to Hydra's search path, so `xentlab-train loss=poly2` finds conf/loss/poly2.yaml.

Hydra imports every module under the `hydra_plugins` namespace package and applies each SearchPathPlugin.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class XentlabPolySearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="xentlab-plugin-example", path="pkg://xentlab_poly.conf")
