using CoordGen.Messages;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using CsCheck;

namespace CoordGen.Engine.Tests;

/// <summary>Lossless speculation: greedy speculative output equals plain greedy output, token for token.</summary>
public class SpeculativeEquivalenceTests
{
    private static readonly string[] Methods = ["pld", "sam", "sam+history", "pld+ours", "sam+ours"];

    [Fact]
    public void Speculative_greedy_should_equal_plain_greedy_when_prompts_seeds_widths_and_methods_vary_on_random_models()
    {
        var configs = new[] { TestModels.Tiny(), TestModels.Tiny(bias: true, tied: false, kvHeads: 1) };
        foreach (var (config, ci) in configs.Select((c, i) => (c, i)))
        {
            var weights = ModelWeights.Random(config, seed: 100 + ci, scale: 0.25f);
            using var rt = new OrtModelRuntime(weights, capacity: 96, widths: [1, 4, 8, 16]);
            var plain = new Generator(rt);
            var spec = new SpeculativeDecoder(rt);
            var history = new HistoryStore();
            // Prompts with repeated phrases, so drafts exist and are sometimes right.
            var gen = Gen.Select(Gen.Int[2, 49].Array[2, 6], Gen.Int[1, 4], Gen.Int[0, 48].Array[0, 10], Gen.Int[0, 2], Gen.Int[0, Methods.Length - 1]);
            gen.Sample((phrase, repeats, noise, wi, mi) =>
            {
                var prompt = Enumerable.Repeat(phrase, repeats).SelectMany(p => p).Concat(noise).Concat(phrase).ToArray();
                int width = new[] { 4, 8, 16 }[wi];
                var expected = plain.Generate(prompt, 24, new SamplingOptions(), new HashSet<int>()).Tokens;
                // Half the cases choose their width per step (1, 4, 8 or 16 up to the width).
                var opts = SpeculationOptions.ForMethod(Methods[mi], width) with { AdaptiveWidth = noise.Length % 2 == 0 };
                var got = spec.Generate(prompt, 24, new SamplingOptions(), new HashSet<int>(), opts, history).Tokens;
                Assert.Equal(expected, got);
                history.Add(expected.ToArray());
            }, iter: 60, threads: 1);
        }
    }

    [Fact]
    public void A_session_that_adopts_the_prefill_cache_should_generate_what_a_copying_one_does_and_own_the_cache()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 9, scale: 0.25f);
        using var rt = new OrtModelRuntime(weights, capacity: 96, widths: [1, 8, 16]);
        var spec = new SpeculativeDecoder(rt);
        int[] prompt = [.. Enumerable.Repeat(new[] { 5, 9, 14, 3 }, 4).SelectMany(p => p), 7, 5, 9];
        var opts = SpeculationOptions.ForMethod("sam+ours", 8);
        var copied = spec.Generate(prompt, 20, new SamplingOptions(), new HashSet<int>(), opts).Tokens;

        var pre = spec.Prefill(prompt, opts.Calibration);
        using var session = spec.Start(pre, 20, new SamplingOptions(), new HashSet<int>(), opts, adoptCache: true);
        Assert.Throws<InvalidOperationException>(() => spec.Start(pre, 20, new SamplingOptions(), new HashSet<int>(), opts, adoptCache: true));
        pre.Dispose(); // leaves the adopted cache to the session
        while (!session.Step())
        {
        }

        Assert.Equal(copied, session.Output);
    }

    [Fact]
    public void Speculative_greedy_should_equal_plain_greedy_on_the_demo_model_for_every_task_and_method()
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64, 8, 32]);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        foreach (var task in new[] { "summary", "rag", "ui", "reply" })
        {
            var history = new HistoryStore();
            foreach (var item in WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl")).Take(3))
            {
                int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
                int max = Math.Min(item.MaxTokens, 64);
                var expected = plain.Generate(prompt, max, new SamplingOptions(), demo.StopTokens).Tokens;
                foreach (var m in Methods)
                {
                    foreach (int w in new[] { 8, 32 })
                    {
                        var got = spec.Generate(prompt, max, new SamplingOptions(), demo.StopTokens, SpeculationOptions.ForMethod(m, w), history).Tokens;
                        Assert.True(expected.SequenceEqual(got), $"{task}/{item.Id} {m} W={w}: speculative output differs from plain greedy");
                        var adaptive = spec.Generate(prompt, max, new SamplingOptions(), demo.StopTokens, SpeculationOptions.ForMethod(m, w) with { AdaptiveWidth = true }, history).Tokens;
                        Assert.True(expected.SequenceEqual(adaptive), $"{task}/{item.Id} {m} W={w} adaptive: speculative output differs from plain greedy");
                    }
                }

                history.Add(expected.ToArray());
            }
        }
    }

    [Fact]
    public void Calibration_built_elsewhere_and_attached_midway_should_keep_the_output_and_add_calibrated_drafts()
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64, 8]);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        var item = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "summary.jsonl")).First();
        int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
        var expected = plain.Generate(prompt, 48, new SamplingOptions(), demo.StopTokens).Tokens;
        var opts = SpeculationOptions.ForMethod("sam+ours", 8);

        // The calibrator's side: the chunks' top-k rows arrive as copies; the index is built after prefill.
        var topK = new PrefillTopK(opts.Calibration.TopK);
        var (prefill, finish) = spec.BeginPrefill(prompt, opts.Calibration, rows => topK.Add(rows));
        while (!prefill.Step())
        {
        }

        using var pre = finish();
        Assert.True(pre.CalibrationDeferred);
        // The drafter's side, as a drafter actor holds it: trees offered to the device's session, each
        // step's outcome handed back; the calibrated paths join after three steps.
        using var session = spec.Start(pre, 48, new SamplingOptions(), demo.StopTokens, opts, externalDrafter: true);
        var drafter = new SessionDrafter(prompt, 48, opts, null);
        for (int i = 0; !session.Done; i++)
        {
            if (i == 3)
            {
                var builder = new CalibratedIndex.Builder(prompt, topK, opts.Calibration);
                builder.Advance(int.MaxValue);
                drafter.AttachCalibration(CalibratedIndex.From(builder.Paths()));
            }

            var (outcome, committed) = session.TakeAdvance();
            var tree = drafter.Advance(outcome, committed);
            Assert.True(session.NeedsProposal);
            session.Offer(tree);
            Assert.False(session.NeedsProposal);
            session.Step();
        }

        var result = session.Result();
        Assert.Equal(expected, result.Tokens);
        Assert.True(result.Accounting.Proposed(DraftSource.Calibrated) > 0, "calibrated drafts should join after the index is attached");
    }

    [Fact]
    public void Drafting_the_next_step_during_verification_should_keep_the_output_and_be_used_when_the_guess_holds()
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64, 8]);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        int used = 0;
        foreach (var item in WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "summary.jsonl")).Take(3))
        {
            int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
            var expected = plain.Generate(prompt, 64, new SamplingOptions(), demo.StopTokens).Tokens;
            using var pre = spec.Prefill(prompt, new CalibrationOptions());
            using var session = spec.Start(pre, 64, new SamplingOptions(), demo.StopTokens, SpeculationOptions.ForMethod("sam+ours", 8));

            // Each step's drafter also drafts the step after it for its likely outcome, as the drafter
            // actor does while the device runs the step; whether that tree is used depends only on the outcome.
            session.DraftAhead = true;
            while (!session.Step())
            {
            }

            Assert.Equal(expected, session.Result().Tokens);
            used += session.AheadUsed;
        }

        Assert.True(used > 0, "no step used the tree drafted during the previous verification");
    }

    [Theory]
    [InlineData(false, true)]
    [InlineData(false, false)]
    [InlineData(true, true)]
    public void Trees_of_several_sessions_in_one_packed_run_should_give_each_its_plain_greedy_output(bool adaptive, bool groupQuery)
    {
        // groupQuery: each slot's tree attends through GroupQueryAttention over its cache in place, its rows
        // staged there by the run itself; false: the caches joined per layer, the rows staged after the run.
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 4, 64, 8], new RuntimeOptions { PackedGroupQuery = groupQuery });
        Assert.Equal(groupQuery, rt.PackedInPlace);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        // Sessions of widths 8 and 4, so packs hold trees of different widths.
        SpeculationOptions Opts(int i) => SpeculationOptions.ForMethod("sam", i % 2 == 0 ? 8 : 4) with { AdaptiveWidth = adaptive };
        var items = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "summary.jsonl")).Take(2)
            .Concat(WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "reply.jsonl")).Take(2)).ToList();
        var prompts = items.Select(i => demo.Tokenizer.Encode(PromptTemplate.Render(i.Context, i.Prompt))).ToList();
        var expected = prompts.Select(p => plain.Generate(p, 48, new SamplingOptions(), demo.StopTokens).Tokens).ToList();

        // Each session with a drafter of its own outside it, as under the actors.
        var sessions = new List<SpeculativeSession>();
        var drafters = new List<SessionDrafter>();
        for (int i = 0; i < prompts.Count; i++)
        {
            using var pre = spec.Prefill(prompts[i], null);
            sessions.Add(spec.Start(pre, 48, new SamplingOptions(), demo.StopTokens, Opts(i), externalDrafter: true));
            drafters.Add(new SessionDrafter(prompts[i], 48, Opts(i), null));
        }

        int packedRuns = 0, mixedRuns = 0;
        while (sessions.Any(s => !s.Done))
        {
            for (int i = 0; i < sessions.Count; i++)
            {
                if (sessions[i].NeedsProposal)
                {
                    var (outcome, committed) = sessions[i].TakeAdvance();
                    sessions[i].Offer(drafters[i].Advance(outcome, committed));
                }
            }

            // Every session whose next step is a tree goes in one run at one member's width, in turn (wider trees
            // keep their first nodes, narrower ones are padded); the rest step alone.
            var live = sessions.Where(s => !s.Done).ToList();
            List<SpeculativeSession> group = [.. live.Where(s => s.NextTreeWidth >= 2)];
            int width = group.Count == 0 ? 0 : group[packedRuns % group.Count].NextTreeWidth;
            if (group.Count < 2)
            {
                group = [];
            }
            else
            {
                mixedRuns += group.Any(s => s.NextTreeWidth != width) ? 1 : 0;
                var trees = SpeculativeSession.BeginPacked(group, width);
                packedRuns++;
                for (int i = 0; i < group.Count; i++)
                {
                    group[i].Apply(TreeVerifier.Verify(trees[i], null));
                }
            }

            foreach (var s in live.Except(group))
            {
                s.Step();
            }
        }

        for (int i = 0; i < sessions.Count; i++)
        {
            Assert.Equal(expected[i], sessions[i].Result().Tokens);
            sessions[i].Dispose();
        }

        Assert.True(packedRuns > 0, "no step packed two sessions' trees");
        Assert.True(adaptive || mixedRuns > 0, $"no packed run held trees of different widths ({packedRuns} packed runs)"); // adaptive widths may agree
    }

    [Fact]
    public void Roots_alone_taken_without_waiting_for_the_drafters_tree_should_keep_each_sessions_plain_greedy_output()
    {
        // While a prompt waits, the device lets a speculative session's root ride in the chunk's run without waiting for
        // its tree (decision 0033). Here two sessions take every other step that way, together in a packed width-1 run;
        // the drafter still learns each step's outcome, and the tree it drafted for such a step comes too late and is
        // dropped, as the device drops it. Both outputs equal plain greedy decoding.
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 4, 64, 8]);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        var opts = SpeculationOptions.ForMethod("sam+ours", 8) with { AdaptiveWidth = true };
        var prompts = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "summary.jsonl")).Take(2)
            .Select(i => demo.Tokenizer.Encode(PromptTemplate.Render(i.Context, i.Prompt))).ToList();
        var expected = prompts.Select(p => plain.Generate(p, 64, new SamplingOptions(), demo.StopTokens).Tokens).ToList();
        var sessions = new List<SpeculativeSession>();
        var drafters = new List<SessionDrafter>();
        foreach (var p in prompts)
        {
            using var pre = spec.Prefill(p, null);
            sessions.Add(spec.Start(pre, 64, new SamplingOptions(), demo.StopTokens, opts, externalDrafter: true));
            drafters.Add(new SessionDrafter(p, 64, opts, null));
        }

        int rootsAlone = 0;
        for (int step = 0; sessions.Any(s => !s.Done); step++)
        {
            var live = sessions.Where(s => !s.Done).ToList();
            bool alone = step % 2 == 1 && live.Count == 2;
            for (int i = 0; i < sessions.Count; i++)
            {
                if (sessions[i].Done)
                {
                    continue;
                }

                var (outcome, committed) = sessions[i].TakeAdvance();
                var tree = drafters[i].Advance(outcome, committed);
                sessions[i].RootAloneWithoutTree = alone;
                Assert.True(sessions[i].NeedsProposal);
                if (!alone)
                {
                    sessions[i].Offer(tree); // else stale by the time it would come
                }
            }

            if (alone)
            {
                Assert.All(live, s => Assert.True(s.NextStepNarrow, "no tree offered, and the root may go alone"));
                var steps = live.Select(s => s.BeginNarrow()).ToList();
                NarrowSteps.RunPacked(rt, steps);
                foreach (var s in live)
                {
                    s.Apply(TreeVerifier.Verify(s.TakeNarrow(), null));
                }

                rootsAlone++;
                continue;
            }

            foreach (var s in live)
            {
                s.Step();
            }
        }

        for (int i = 0; i < sessions.Count; i++)
        {
            Assert.Equal(expected[i], sessions[i].Result().Tokens);
            sessions[i].Dispose();
        }

        Assert.True(rootsAlone >= 2, $"only {rootsAlone} steps took the roots alone"); // how many depends on the widths chosen, which follow measured times

        // While riding is priced, a tree offered in time is weighed at the rider's price too, and neither the every-16th
        // full-width step nor a width never timed forces a tree that would miss the chunk: every step is the root alone.
        using var ridingPre = spec.Prefill(prompts[1], null);
        using var riding = spec.Start(ridingPre, 64, new SamplingOptions(), demo.StopTokens, opts, externalDrafter: true);
        var ridingDrafter = new SessionDrafter(prompts[1], 64, opts, null);
        int ridingSteps = 0, narrowSteps = 0;
        for (; !riding.Done; ridingSteps++)
        {
            var (outcome, committed) = riding.TakeAdvance();
            riding.Offer(ridingDrafter.Advance(outcome, committed));
            bool ride = ridingSteps >= 4; // its own tree steps first
            riding.RootAloneWithoutTree = ride;
            riding.SharedStepMs = ride ? new Dictionary<int, double> { [1] = 1e-3 } : null;
            narrowSteps += ride && riding.NextStepNarrow ? 1 : 0;
            riding.Step();
        }

        Assert.Equal(expected[1], riding.Result().Tokens);
        Assert.True(ridingSteps >= 36, $"{ridingSteps} steps"); // at most 32 tokens from its first four trees of 8
        Assert.Equal(ridingSteps - 4, narrowSteps);

        // A fixed width always verifies a tree: the switch stays off.
        using var fixedPre = spec.Prefill(prompts[0], null);
        using var fixedWidth = spec.Start(fixedPre, 8, new SamplingOptions(), demo.StopTokens, SpeculationOptions.ForMethod("sam+ours", 8), externalDrafter: true);
        fixedWidth.RootAloneWithoutTree = true;
        Assert.False(fixedWidth.RootAloneWithoutTree);
        Assert.False(fixedWidth.NextStepNarrow);
    }

    [Fact]
    public void A_packed_tree_step_should_refuse_a_session_without_room_in_its_cache_for_the_packs_width()
    {
        // A width-4 session 56 tokens into a 64-slot cache fits its own trees but not a pack of width 8: the
        // device leaves it out of such a pack (Packing.Group), and BeginPacked refuses it before touching any cache.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 4, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 64, widths: [1, 4, 8]);
        var spec = new SpeculativeDecoder(rt);
        var opts = SpeculationOptions.ForMethod("sam", 4);
        int[][] prompts = [[.. Enumerable.Range(0, 56).Select(i => 2 + (i % 9))], [5, 6, 7, 5, 6, 7, 5, 6]];
        var sessions = new List<SpeculativeSession>();
        try
        {
            foreach (var p in prompts)
            {
                using var pre = spec.Prefill(p, null);
                var session = spec.Start(pre, 4, new SamplingOptions(), new HashSet<int>(), opts, externalDrafter: true);
                var (outcome, committed) = session.TakeAdvance();
                session.Offer(new SessionDrafter(p, 4, opts, null).Advance(outcome, committed));
                sessions.Add(session);
            }

            Assert.All(sessions, s => Assert.Equal(4, s.NextTreeWidth));
            Assert.True(sessions[0].RoomForTree(4));
            Assert.False(sessions[0].RoomForTree(8));
            Assert.Throws<InvalidOperationException>(() => SpeculativeSession.BeginPacked(sessions, 8));
            Assert.Equal(2, SpeculativeSession.BeginPacked(sessions, 4).Length); // at a width it has room for, it packs
        }
        finally
        {
            sessions.ForEach(s => s.Dispose());
        }
    }
}
