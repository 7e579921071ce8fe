"""A plugin that fails to import, as a plugin with a missing dependency would."""

raise RuntimeError("liger_broken_plugin is broken on purpose (a missing dependency, say)")
