"""tga/demo

The built-in synthetic world of `make demo`: seeded multi-object scenes of benign and toxic concepts (`world`,
`render`), the data files of both VL stages and of the safety tests (`datasets`, `tasks`), a tiny CLIP
(`clip_train`) and a tiny text LLM with a text safety mechanism (`text_corpus`, `text_llm`), all built and cached by
`build_assets` (`assets`). World 2, a design that did not meet its criteria, is in
research/world2/ of a checkout (docs/demo_world.md).
"""

