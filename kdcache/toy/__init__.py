"""The toy world: everything `kdcache quickstart` needs to run the LLaVA-KD recipe on a CPU in minutes.

    kdcache.toy.data     the synthetic shapes dataset (LLaVA JSON + PNGs, train / held-out)
    kdcache.toy.models   the toy tokenizer, tower and LMs behind the presets toy-teacher / toy-student
    kdcache.toy.recipe   the recipe end to end through the real jobs (`run_quickstart`, `Recipe`)

The toy code builds on the core (`kdcache.models`), never the other way round: the core reaches the
toy presets only through the "module:function" strings of `kdcache.presets`. Importing this package
imports none of its modules, so it stays as light as the core.
"""
