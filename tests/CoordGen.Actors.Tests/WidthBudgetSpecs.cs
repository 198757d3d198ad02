using CoordGen.Actors.Device;
using CoordGen.Messages;

namespace CoordGen.Actors.Tests;

/// <summary>The width budget across sessions (decision 0028): which trees share a packed run, at what width. Pure, table-tested.</summary>
public class WidthBudgetSpecs
{
    private static SessionRun Id(string name) => new(new SessionId(name), 1);

    // Sessions as "name:e8/e4" (expected tokens at widths 8 and 4; 0 = no room); options as "w,n,ms,pays,learn[,refused]" (ms "-" = unknown).
    private static WidthBudgetSnapshot Snapshot(string sessions, string options) => new(
        [8, 4],
        [.. sessions.Split(' ').Select(s => s.Split(':')).Select(p => new BudgetSession(Id(p[0]), [.. p[1].Split('/').Select(double.Parse)]))],
        [.. options.Split(' ').Select(o => o.Split(',')).Select(p => new BudgetOption(int.Parse(p[0]), int.Parse(p[1]), p[2] == "-" ? null : double.Parse(p[2]), p[3] == "y", p[4] == "y", p.Length > 5 && p[5] == "y"))]);

    [Theory]
    // Trees that expect little beyond four rows: the narrower pack gives more tokens per millisecond (9 / 30 beats 10 / 45).
    [InlineData("a:2.6/2.3 b:2.5/2.2 c:2.4/2.2 d:2.5/2.3", "8,4,45,y,n 4,4,30,y,n", 4, "adbc")]
    // Trees worth their eight rows: the wide pack (20 / 45 beats 12 / 30).
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,y,n 4,4,30,y,n", 8, "abcd")]
    // The widest pack does not pay: the next one that does.
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,n,n 4,4,30,y,n", 4, "abcd")]
    // A pack never measured runs first, to learn its time, whatever the others promise.
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,y,n 4,4,-,y,y", 4, "abcd")]
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,n,y 4,4,30,y,n", 8, "abcd")]
    // As many trees as the width holds, the pick first and the others by what they expect (b before d on a tie)...
    [InlineData("a:3/2 b:2/2 c:6/3 d:2/2", "8,4,60,y,n 8,2,20,y,n", 8, "acbd")]
    // ...and fewer in a smaller graph only where the larger does not pay: the pick and the one that expects the most.
    [InlineData("a:3/2 b:2/2 c:6/3 d:2/2", "8,4,60,n,n 8,2,20,y,n", 8, "ac")]
    // A session without room for the wider width: the narrower pack holds it too, and leaves no one to a run of their own...
    [InlineData("a:3/2 b:0/2 c:3/2", "8,2,20,y,n 4,3,20,y,n", 4, "abc")]
    // ...whatever two of them would expect per millisecond at the wider one (10 / 20 against 12 / 30).
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,2,20,y,n 4,4,30,y,n", 4, "abcd")]
    // Where the wider width holds them all, the one left out of it is left out.
    [InlineData("a:3/2 b:0/2 c:3/2", "8,2,20,y,n 4,2,20,y,n", 8, "ac")]
    public void Budget_should_choose_the_pack_with_the_most_expected_tokens_per_millisecond(string sessions, string options, int width, string members)
    {
        var choice = WidthBudget.Choose(Snapshot(sessions, options));
        Assert.Equal(width, choice.Width);
        Assert.Equal(members.Select(c => Id(c.ToString())), choice.Members);
        Assert.True(choice.Packed);
    }

    [Theory]
    [InlineData("a:2.6/2.3 b:2.5/2.2 c:2.4/2.2 d:2.5/2.3", "8,4,45,y,n 4,4,30,y,n", 8)] // the widest that pays, whatever the trees expect
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,n,n 4,4,30,y,n", 4)]
    [InlineData("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,n,y 4,4,30,y,n", 8)]
    public void The_rule_before_the_budget_should_take_the_widest_pack_that_pays(string sessions, string options, int width)
    {
        Assert.Equal(width, WidthBudget.Widest(Snapshot(sessions, options)).Width);
    }

    [Theory]
    [InlineData("a:5/3 b:5/3", "8,2,20,n,n 4,2,20,n,n")] // nothing pays
    [InlineData("a:0/0 b:5/3", "8,2,20,y,n")] // the pick has no room: it steps alone
    [InlineData("a:5/3 b:0/0", "8,2,20,y,n")] // no one to pack with at that width
    public void Budget_should_choose_no_pack_when_none_pays_or_fits(string sessions, string options)
    {
        Assert.Equal(WidthBudgetChoice.None, WidthBudget.Choose(Snapshot(sessions, options)));
    }

    [Fact]
    public void The_rule_before_the_budget_should_take_the_others_in_their_order_not_by_what_they_expect()
    {
        var s = Snapshot("a:1/1 b:2/2 c:3/3", "8,2,10,y,n");
        Assert.Equal([Id("a"), Id("b")], WidthBudget.Widest(s).Members.ToArray());
        Assert.Equal([Id("a"), Id("c")], WidthBudget.Choose(s).Members.ToArray());
    }

    [Theory]
    // A pack never measured is one to learn; once its ratio is known it pays below 0.75 of a solo run per session (3 of 4)...
    [InlineData(20.0, null, null, true, "-", false, true, false)]
    [InlineData(20.0, 2.0, null, true, "40", true, false, false)]
    [InlineData(20.0, 2.0, 35.0, true, "35", true, false, false)] // its own bucket's time over a ratio from other buckets
    // ...and above that it is refused (asked now and then whether to measure it again).
    [InlineData(20.0, 3.5, null, true, "70", false, false, true)]
    // Steps too short to pack, or a graph not compiled yet: nothing.
    [InlineData(3.0, 2.0, null, true, "6", false, false, false)]
    [InlineData(20.0, 2.0, null, false, "40", false, false, false)]
    public void Options_should_pay_be_learned_or_be_refused_by_the_measured_times(double? soloMs, double? ratio, double? packedMs, bool ready, string ms, bool pays, bool learn, bool refused)
    {
        var o = WidthBudget.Option(8, 4, soloMs, ratio, packedMs, ready);
        Assert.Equal((ms == "-" ? null : double.Parse(ms), pays, learn, refused), (o.Ms, o.Pays, o.Learn, o.Refused));
        Assert.True(WidthBudget.Option(8, 4, null, null, null, ready: false, always: true) is { Pays: true, Learn: true });
    }

    [Fact]
    public void Refused_packs_should_be_asked_whether_to_run_again_only_before_the_first_that_may_run()
    {
        int asked = 0;
        bool Ask(BudgetOption _) => ++asked > 0 && false;

        // The widest pays: no refused pack after it is asked (each question counts towards its next probe).
        var s = Snapshot("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,45,y,n 4,4,90,n,n,y");
        Assert.Equal(s.Options.ToArray(), WidthBudget.WithProbes(s, Ask).Options.ToArray());
        Assert.Equal(0, asked);

        // A refused widest pack is asked; refused, it stays so, and the narrower one runs.
        s = Snapshot("a:5/3 b:5/3 c:5/3 d:5/3", "8,4,90,n,n,y 4,4,30,y,n");
        Assert.Equal(4, WidthBudget.Choose(WidthBudget.WithProbes(s, Ask)).Width);
        Assert.Equal(1, asked);

        // Due to be measured again: it runs, to learn.
        Assert.Equal(8, WidthBudget.Choose(WidthBudget.WithProbes(s, _ => true)).Width);
    }

    [Fact]
    public void Members_should_keep_the_pick_first_and_rank_the_others_by_expected_tokens()
    {
        var s = Snapshot("a:1.2/1 b:2/1.5 c:4/2 d:3/3", "8,4,1,y,n");
        Assert.Equal([Id("a"), Id("c"), Id("d")], WidthBudget.Members(s, 0, 3)!.Select(m => m.Session));
        Assert.Equal([Id("a"), Id("d"), Id("c")], WidthBudget.Members(s, 1, 3)!.Select(m => m.Session));
        Assert.Null(WidthBudget.Members(s, 0, 5));
        Assert.Equal([Id("a")], WidthBudget.Members(s, 0, 1)!.Select(m => m.Session));
    }
}
