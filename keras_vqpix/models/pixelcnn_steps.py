"""The Gated PixelCNN's forward pass as row and column steps, for sampling (Ramachandran et al. 2017, https://arxiv.org/abs/1704.06001)."""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_vqpix.layers.gated_pixelcnn import gate


def _for_every_map(row) -> bool:
    """Whether `row` is one value for every map (a Python number or a scalar tensor), not one per
    map (a wavefront)."""
    return not isinstance(row, tf.Tensor) or row.shape.rank == 0


class PixelCNNSteps:
    """A `PixelCNN`'s logits computed position by position from cached activations.

    Ancestral sampling needs the logits at `(r, c)` once the codes before it are drawn. In a
    Gated PixelCNN (`GatedBlock`) these come from two stacks, so the forward pass splits into
    two kinds of step, each computing only what the next position needs:

    - `finish_row(state, codes_row, row)`, once a row is drawn: the vertical stack of that row in
      every block (a `(k//2 + 1) x k` convolution, dilated by d, over the block's last
      `d (k//2) + 1` vertical input rows, kept in `state`), and its `vertical_to_horizontal` term, which the
      horizontal stack of the *next* row reads (the model's `down_shift`).
    - `column(state, row_state, c)`: the horizontal stack at column `c` of the current row in
      every block (a `1 x k` masked convolution over the block's last `k//2` horizontal
      inputs, kept in `row_state`, and the current one), the gates, the residuals, the skip
      sum and the head: the logits `[n, K]` at `(r, c)`. `push_code(row_state, codes, row, col)` then
      appends the drawn codes' embeddings, the first block's input at the next column.

    All caches start at zero, the zero padding of the model's convolutions. A whole code map
    costs about one forward pass of arithmetic, in `h * w` small column steps and `h` row
    steps (the "fast generation" caching of Ramachandran et al. 2017).

    Exactness: the steps compute the model's function with its own weights, but with their own
    operation shapes (a 1 x 1 position instead of a whole map), and CPU kernels round
    differently for different shapes; so the logits match `PixelCNN.call` to float rounding,
    not bit for bit. Both samplers of `keras_vqpix.sampling` therefore compute their logits
    with these steps: the reference recomputes every step from the codes for each position,
    the fast sampler caches them; each step sees the same operations on the same shapes and
    values in both, hence the same bits. Nor do the bits depend on where the steps run (eagerly,
    or in a graph traced with static or dynamic shapes; tested): every sum of more than two
    terms is one reduction, not a chain of adds that graph optimizers may reassociate.

    Shapes: `n` maps of width `w`, `k = kernel_size`, `p = filters`, `E = embedding_dim`,
    `L + 1` blocks, block i dilated by d_i. `state`: a tuple of, per block, its vertical inputs
    of the last `d_i (k//2)` rows `[n, d_i (k//2), w + 2 d_i (k//2), C]` (C = E for the first
    block, p after), and the next row's
    horizontal bias `[n, w, L + 1, 2p]`. `row_state`: per block, its horizontal inputs of the
    last `k//2` columns, flattened `[n, (k//2) C]`. E.g. the default prior (K = 256, 10 blocks
    of 32 filters, k = 3) keeps per map 10 x 1 x 34 x 32 vertical and 10 x 32 horizontal
    values, and a column step multiplies `[n, 96]` by `[96, 64]` per block.

    Slice context (a `PixelCNN` with `has_slice_context`): `start` computes the context of
    every row from the previous slice's codes and the position, row by row as the samplers of
    a stack will (`SliceContext.row`), and the state carries it `[n, h + 1, w, F]` (a zero row
    below the last); `finish_row` adds row r's to the vertical gates and row r + 1's to the
    next row's horizontal terms, as `GatedBlock.call` adds them. Sums of three terms are one
    reduction (see Exactness).

    Attention (a `PixelCNN` with `attention_every`): the state ends with the keys and values of
    every attention layer at the positions drawn so far (`CausalSelfAttention.start_cache`),
    which `column` reads and extends, one position at a time in raster order. A row then runs
    `row_state = start_row(state)` (the row state carries the caches along the row), its
    columns, and `finish_row(end_row(state, row_state), ...)` (the caches back into the state);
    without attention `start_row` and `end_row` leave the state alone, so samplers run this one
    sequence for every prior.

    Layout (a `PixelCNN` with `layout_levels`, the code level of a two-level prior): `start`
    computes the layout's condition once, whole (the layout is drawn before any code), and the
    state carries it as it carries a slice context.

    Build it inside the `tf.function` that samples (it reads the weights once per call).

    Args:
        prior: a built `PixelCNN`.
        labels: `[n]` int32 labels (-1: unconditional); ignored by an unconditional prior.
        width: int, code map width w.
        previous: `[n, h, w]` int32, the previous slice's codes (-1: none), or None (none);
            ignored by a prior without slice context.
        positions: `[n]` int32 position bins (-1: unknown), or None (unknown).
        guidance: None, or a float32 scalar w: classifier-free guidance (Ho and Salimans
            2022, https://arxiv.org/abs/2207.12598), the logits `u + w (c - u)` of the
            label's logits c and the unconditional (label -1) logits u, which the label
            dropout of training taught the same prior. The steps then run each map twice
            (with its label and with -1; `num_maps` is 2n inside) on the same codes and
            context, and `column` returns the n guided logits; every other method takes and
            returns the n maps as without guidance. w = 1 draws from the conditional prior
            itself, w > 1 strengthens what tells the class apart.
        layout: `[n, h / f, w / f]` int32, a layout prior's layout (`PixelCNN.layout_levels`);
            ignored by any other prior.
    """

    def __init__(
        self, prior, labels, width: int, previous=None, positions=None, guidance=None, layout=None
    ):
        self.prior = prior
        self.layout = layout
        self.width = int(width)
        self.previous, self.positions = previous, positions
        self.half = prior.kernel_size // 2
        self.guidance = None if guidance is None else tf.cast(guidance, tf.float32)
        self.num_drawn = tf.shape(labels)[0]  # n: the maps drawn
        if self.guidance is not None:  # each map twice: with its label, and unconditional
            labels = tf.concat([labels, tf.fill(tf.shape(labels), -1)], axis=0)
        self.num_maps = tf.shape(labels)[0]  # the maps the steps compute
        self.attentions = [a for a in prior.attentions if a is not None]
        self.has_context = prior.has_slice_context or bool(prior.layout_levels)
        label_rows = prior.label_indices(labels, self.num_maps) if prior.conditional else None
        half = self.half
        self.vertical_labels, self.horizontal_bias, self.vertical_kernels = [], [], []
        self.pointwise = []  # per block: layer name -> (kernel, bias) of its 1x1 convolutions
        self.horizontal_kernels, self.output_kernels, self.output_biases = [], [], []
        for block in prior.blocks:
            dtype = block.compute_dtype
            vertical = block.vertical_conv
            self.vertical_kernels.append(
                (ops.cast(vertical.kernel, dtype), ops.cast(vertical.bias, dtype), block.dilation)
            )
            # The block's 1x1 convolutions, by attribute name, as a matmul's (kernel, bias).
            names = ["vertical_to_horizontal"]
            if block.spatial_condition:
                names += ["vertical_condition", "horizontal_condition"]
            self.pointwise.append(
                {
                    name: (
                        ops.cast(getattr(block, name).kernel, dtype)[0, 0],
                        ops.cast(getattr(block, name).bias, dtype),
                    )
                    for name in names
                }
            )
            conv = block.horizontal_conv
            taps = half if block.mask_type == "A" else half + 1
            # The taps the mask keeps: columns c - k//2 .. c - 1 (mask A) or .. c (mask B).
            kernel = ops.cast(conv.kernel * conv.mask, dtype)[0, :taps]
            self.horizontal_kernels.append(ops.reshape(kernel, (-1, kernel.shape[-1])))
            bias = ops.cast(conv.bias, dtype)[None, :]
            vertical_label = None
            if label_rows is not None and block.num_labels:
                vertical_label = block.vertical_label(label_rows)[:, None, None, :]
                bias = bias + block.horizontal_label(label_rows)
            self.vertical_labels.append(vertical_label)
            self.horizontal_bias.append(bias)
            # horizontal_output and skip read the same gated units: one matmul for both.
            self.output_kernels.append(
                ops.cast(
                    ops.concatenate([block.horizontal_output.kernel, block.skip.kernel], -1),
                    dtype,
                )[0, 0]
            )
            self.output_biases.append(
                ops.cast(ops.concatenate([block.horizontal_output.bias, block.skip.bias], 0), dtype)
            )
        dtype = prior.head_hidden.compute_dtype
        self.head_hidden = (
            ops.cast(prior.head_hidden.kernel, dtype)[0, 0],
            ops.cast(prior.head_hidden.bias, dtype),
        )
        self.head_logits = (
            ops.cast(prior.head_logits.kernel, "float32")[0, 0],
            ops.cast(prior.head_logits.bias, "float32"),
        )

    # -- Slice context --------------------------------------------------------------------------------
    def twice(self, values):
        """`values` of the n maps drawn as the steps compute them: twice under guidance (a row
        for every map, a scalar, stays as it is)."""
        if self.guidance is None or values is None or _for_every_map(values):
            return values
        return tf.concat([values, values], axis=0)

    def context_rows(self):
        """The slice context `[n, h + 1, w, F]` of every row (and a zero row below), row by row
        (of the n maps drawn: under guidance both runs of a map share it)."""
        context_layer = self.prior.slice_context
        height = self.prior.code_shape[0]
        shape = (self.num_drawn, height, self.width)
        blank = tf.zeros(shape, tf.int32)
        previous, positions = self.prior.context_inputs(blank, self.previous, self.positions)
        previous = tf.ensure_shape(
            tf.broadcast_to(previous, tf.stack(shape)), [None, height, self.width]
        )
        dtype = context_layer.compute_dtype

        def body(row, cache, rows):
            context, cache = context_layer.row(cache, previous[:, row], positions)
            return row + 1, cache, rows.write(row, context)

        _, _, rows = tf.while_loop(
            lambda row, *_: row < height,
            body,
            (
                tf.constant(0),
                context_layer.start_rows(self.num_drawn, self.width, dtype),
                tf.TensorArray(dtype, height),
            ),
        )
        zero = tf.zeros((1, self.num_drawn, self.width, context_layer.filters), dtype)
        return tf.transpose(tf.concat([rows.stack(), zero], 0), (1, 0, 2, 3))

    def layout_rows(self):
        """A layout prior's condition `[n, h + 1, w, F]` (and a zero row below), all at once: the
        layout is given in full before any code is drawn."""
        condition = self.prior.context(None, layout=self.layout)  # one-line error without one
        zero = tf.zeros_like(condition[:, :1])
        return tf.concat([condition, zero], axis=1)

    @staticmethod
    def _pointwise(weights, inputs):
        """A 1x1 convolution of `inputs [..., C]` with `weights` (kernel `[C, D]`, bias `[D]`,
        from `self.pointwise`) as one matmul (a CPU convolution of a one-row map costs several
        times as much)."""
        kernel, bias = weights
        flat = tf.reshape(ops.cast(inputs, kernel.dtype), [-1, kernel.shape[0]])
        outputs = tf.nn.bias_add(tf.matmul(flat, kernel), bias)
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [kernel.shape[1]]], 0))

    @staticmethod
    def _sum(*terms):
        """`terms` added as one reduction when there are more than two (see Exactness)."""
        terms = [t for t in terms if t is not None]
        if len(terms) <= 2:
            return terms[0] if len(terms) == 1 else terms[0] + terms[1]
        shape = tf.shape(terms[0])
        return tf.reduce_sum(tf.stack([tf.broadcast_to(t, shape) for t in terms]), axis=0)

    # -- Vertical stack: once per row --------------------------------------------------------------
    def start(self):
        """The state before row 0: zero rows above the map (and the slice context or the layout's
        condition, if any)."""
        context = None
        if self.prior.has_slice_context:
            context = self.context_rows()
        elif self.prior.layout_levels:
            context = self.layout_rows()
        terms = self.start_terms(None if context is None else context[:, :1])
        state = (self.zero_rows(), terms) + (() if context is None else (context,))
        if self.attentions:
            caches = tuple(
                attention.start_cache(self.num_maps, attention.compute_dtype)
                for attention in self.attentions
            )
            state += (caches,)
        return state

    def zero_rows(self):
        """Each block's vertical inputs above row 0: the zero padding of its convolution."""
        rows = []
        for i, block in enumerate(self.prior.blocks):
            channels = self.prior.embedding_dim if i == 0 else block.filters
            reach = block.vertical_reach
            shape = (self.num_maps, reach, self.width + 2 * reach, channels)
            rows.append(tf.zeros(shape, block.compute_dtype))
        return tuple(rows)

    def start_terms(self, context_first=None):
        """Row 0's horizontal terms `[n, w, L + 1, 2p]` (`context_first [n, 1, w, F]`: row 0 of
        the slice context, or None)."""
        filters = self.prior.blocks[0].filters
        # Row 0's horizontal stack reads the shifted-in zero row through vertical_to_horizontal.
        zero_row = tf.zeros(
            (self.num_maps, 1, self.width, 2 * filters), self.prior.blocks[0].compute_dtype
        )
        terms = [
            self._sum(
                self._pointwise(pointwise["vertical_to_horizontal"], zero_row)[:, 0],
                bias[:, None, :],
                None
                if context_first is None
                else self._pointwise(pointwise["horizontal_condition"], self.twice(context_first))[
                    :, 0
                ],
            )
            for bias, pointwise in zip(self.horizontal_bias, self.pointwise, strict=True)
        ]
        return self._by_column(terms)

    @staticmethod
    def context_row(context, row):
        """Row `row` (a scalar, or one per map `[n]`) of the slice context: `[n, 1, w, F]`."""
        if _for_every_map(row):
            return tf.gather(context, [row], axis=1)
        return tf.gather(context, row[:, None], axis=1, batch_dims=1)

    def computed_rows(self, maps):
        """Where the drawn maps `maps [m]` are among the maps the steps compute: twice under
        guidance (map i's unconditional run is map n + i)."""
        if self.guidance is None:
            return maps
        return tf.concat([maps, maps + self.num_drawn], axis=0)

    def finish_row(self, state, codes_row, row, maps=None):
        """The state after row `row`, `codes_row [n, w]`, was drawn: its vertical stack, for the
        next row. `row`: a scalar, or one row per map `[n]` (see `PixelCNN.embed`).

        `maps`: None, or int32 `[m]`, the drawn maps whose row this is: `state`, `codes_row` and
        `row` are then those m maps' only (a wavefront's maps that drew at this step; the others'
        state does not change), each map computed as among all n.
        """
        rows, context = state[0], (state[2] if self.has_context else None)
        vertical_labels, horizontal_bias = self.vertical_labels, self.horizontal_bias
        if maps is not None:  # a block with label terms has them per map, in both lists
            computed = self.computed_rows(maps)
            horizontal_bias = [
                bias if label is None else tf.gather(bias, computed)
                for bias, label in zip(horizontal_bias, vertical_labels, strict=True)
            ]
            vertical_labels = [
                None if label is None else tf.gather(label, computed) for label in vertical_labels
            ]
        here = below = None
        if context is not None:
            here = self.twice(self.context_row(context, row))  # [n, 1, w, F]
            below = self.twice(self.context_row(context, row + 1))
        x = self.prior.embed(self.twice(codes_row), self.twice(row))  # [n, w, E]
        new_rows, terms = [], []
        for block, above, label, bias, (kernel, conv_bias, dilation), pointwise in zip(
            self.prior.blocks,
            rows,
            vertical_labels,
            horizontal_bias,
            self.vertical_kernels,
            self.pointwise,
            strict=True,
        ):
            reach = block.vertical_reach
            current = ops.pad(x, [[0, 0], [reach, reach], [0, 0]])[:, None]
            window = ops.concatenate([above, ops.cast(current, above.dtype)], axis=1)
            # The block's vertical convolution, called as one op: Keras runs a dilated one as
            # space-to-batch, conv, batch-to-space, four times the cost of this 1-row output.
            vertical_conv = tf.nn.conv2d(window, kernel, 1, "VALID", dilations=dilation)
            vertical_pre = self._sum(
                tf.nn.bias_add(vertical_conv, conv_bias),  # [n, 1, w, 2p]
                label,
                None if here is None else self._pointwise(pointwise["vertical_condition"], here),
            )
            terms.append(
                self._sum(
                    self._pointwise(pointwise["vertical_to_horizontal"], vertical_pre)[:, 0],
                    bias[:, None, :],
                    None
                    if below is None
                    else self._pointwise(pointwise["horizontal_condition"], below)[:, 0],
                )
            )
            new_rows.append(window[:, 1:])
            x = gate(vertical_pre)[:, 0]
        # The slice context (or layout) and the attention caches go on unchanged.
        return (tuple(new_rows), self._by_column(terms), *state[2:])

    @staticmethod
    def _by_column(terms):
        """Per-block `[n, w, 2p]` terms -> `[n, w, L + 1, 2p]`: a column is one gather, and a
        map's terms one row (a wavefront updates the maps that drew a row only)."""
        return ops.stack(terms, axis=2)

    # -- Horizontal stack and head: once per position ----------------------------------------------
    def start_row(self, state=None):
        """The row state before column 0: zero columns left of the map (and, with attention,
        the caches of `state`, the state after the rows above)."""
        n, half = self.num_maps, self.half
        columns = []
        for i, block in enumerate(self.prior.blocks):
            channels = self.prior.embedding_dim if i == 0 else block.filters
            columns.append(tf.zeros((n, half * channels), block.compute_dtype))
        if self.attentions:
            if state is None:
                raise ValueError("A prior with attention starts a row from its state")
            columns.append(state[-1])
        return tuple(columns)

    def end_row(self, state, row_state):
        """`state` with the attention caches of the row just drawn (`row_state`, after its last
        column); `state` itself without attention."""
        if not self.attentions:
            return state
        return (*state[:-1], row_state[-1])

    def column(self, state, row_state, col):
        """`(logits [n, K] float32, row state)` at column `col` of the row being drawn.

        The first block's inputs in the returned row state still lack the code at `col`:
        `push_code` adds it once drawn.
        """
        horizontal_terms = state[1]
        terms = tf.unstack(
            tf.gather(horizontal_terms, col, axis=1), num=len(self.prior.blocks), axis=1
        )
        new_row_state = [row_state[0]]
        caches = iter(row_state[-1] if self.attentions else ())  # one per attention, in order
        new_caches = []
        x, skips = None, []
        for i, block in enumerate(self.prior.blocks):
            if block.mask_type == "A":
                taps = row_state[i]
            else:
                taps = ops.concatenate([row_state[i], x], axis=-1)
                new_row_state.append(taps[:, x.shape[-1] :])
            pre = ops.matmul(taps, self.horizontal_kernels[i]) + terms[i]
            outputs = tf.nn.bias_add(
                ops.matmul(gate(pre), self.output_kernels[i]), self.output_biases[i]
            )
            out, skip = ops.split(outputs, 2, axis=-1)
            x = out if block.mask_type == "A" else x + out
            skips.append(skip)
            attention = self.prior.attentions[i]
            if attention is not None:
                update, cache = attention.step(x, next(caches))
                new_caches.append(cache)
                x = x + update
        # One sum, in a fixed order (a chain of adds is what graph optimizers reassociate).
        total = tf.reduce_sum(tf.stack([*skips, x]), axis=0)
        kernel, bias = self.head_hidden
        hidden = ops.relu(tf.nn.bias_add(ops.matmul(ops.relu(total), kernel), bias))
        kernel, bias = self.head_logits
        logits = tf.nn.bias_add(ops.matmul(ops.cast(hidden, "float32"), kernel), bias)
        if self.guidance is not None:
            conditional, unconditional = tf.split(logits, 2, axis=0)
            logits = unconditional + self.guidance * (conditional - unconditional)
        if self.attentions:
            new_row_state.append(tuple(new_caches))
        return logits, tuple(new_row_state)

    def push_code(self, row_state, codes, row, col):
        """The row state moved on by one column: `codes [n]` just drawn at `(row, col)` (`row`
        a scalar or one per map)."""
        embedded = self.prior.embed(self.twice(codes), self.twice(row), col)
        first = row_state[0]
        embedded = ops.cast(embedded, first.dtype)
        return (ops.concatenate([first[:, embedded.shape[-1] :], embedded], -1), *row_state[1:])

    # -- Everything from scratch -------------------------------------------------------------------
    def position_logits(self, codes, row, col):
        """Logits `[n, K]` at `(row, col)` of `codes [n, h, w]`, every step recomputed from the codes.

        The rows above `row` through `finish_row`, then columns `0 .. col` of `row` through
        `column` and `push_code`: all the activations the logits at `(row, col)` depend on,
        with the operations the cached sampler runs.
        """
        codes = ops.cast(codes, "int32")

        def columns(state, r, end):
            """The row state after columns `0 .. end - 1` of row `r`."""

            def body(c, row_state):
                _, row_state = self.column(state, row_state, c)
                return c + 1, self.push_code(row_state, codes[:, r, c], r, c)

            return tf.while_loop(
                lambda c, _: c < end, body, (tf.constant(0), self.start_row(state))
            )[1]

        def finish(r, state):
            if self.attentions:  # the attention reads the columns of every row above too
                state = self.end_row(state, columns(state, r, self.width))
            return r + 1, self.finish_row(state, codes[:, r], r)

        _, state = tf.while_loop(lambda r, _: r < row, finish, (tf.constant(0), self.start()))
        return self.column(state, columns(state, row, col), col)[0]
