"""tga/serve

`tga serve`: a red-teaming playground in the browser. `session` answers an (image, request) with every model x defence
(no gradio needed), `loading` builds that from the command's flags, `examples` finds the demo world's scenes, and
`app` is the gradio page and its server.
"""
