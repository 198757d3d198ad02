using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>
/// The width budget across sessions (decision 0028): when several speculative sessions' trees are ready, which of them
/// share one packed run and at what width. Packed graphs are static, [slots x width] rows, so the rows a pack spends are
/// its slot count times its width whatever the trees hold; the budget is the choice of width and members that expects
/// the most tokens per millisecond of the run. Each session's expected tokens at a width are its root's token plus its
/// tree's first nodes' estimated chances of acceptance (per source and depth, from its recent steps:
/// <c>NodeAcceptance</c>). Pure, table-tested; the device logs each decision with its snapshot for replay.
/// </summary>
public static class WidthBudget
{
    /// <summary>
    /// The pack to run from <paramref name="snapshot"/>. At each width, the first option that pays or is due to be learned
    /// (as many sessions as the width holds, a smaller graph only where the larger does not pay: a session left out
    /// would need a run of its own); then the first of those to learn (its time unknown, or a refused pack due to be
    /// measured again), else the one whose members expect the most tokens per millisecond (the wider on a tie);
    /// <see cref="WidthBudgetChoice.None"/> when none pays.
    /// </summary>
    public static WidthBudgetChoice Choose(WidthBudgetSnapshot snapshot)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        WidthBudgetChoice? best = null;
        double bestRate = double.NegativeInfinity;
        foreach (int width in snapshot.Widths)
        {
            if (First(snapshot, o => o.Width == width) is not var (choice, o))
            {
                continue;
            }

            if (o.Learn || o.Ms is not { } ms)
            {
                return choice;
            }

            double rate = choice.ExpectedTokens / Math.Max(1e-6, ms);
            if (rate > bestRate)
            {
                (best, bestRate) = (choice, rate);
            }
        }

        return best ?? WidthBudgetChoice.None;
    }

    /// <summary>
    /// The rule before the budget, kept to compare against it: the first option that pays or is due to be learned, in the
    /// snapshot's order (the widest width, the most sessions), with the same ranked members.
    /// </summary>
    public static WidthBudgetChoice Widest(WidthBudgetSnapshot snapshot)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        return First(snapshot, _ => true)?.Choice ?? WidthBudgetChoice.None;
    }

    // The first option in the snapshot's order that pays or is due to be learned, among those <paramref name="where"/> takes, with its members.
    private static (WidthBudgetChoice Choice, BudgetOption Option)? First(WidthBudgetSnapshot snapshot, Func<BudgetOption, bool> where)
    {
        foreach (var o in snapshot.Options)
        {
            int at = snapshot.Widths.IndexOf(o.Width);
            if ((o.Pays || o.Learn) && at >= 0 && where(o) && Members(snapshot, at, o.Sessions) is { } members)
            {
                return (new WidthBudgetChoice(o.Width, [.. members.Select(m => m.Session)], members.Sum(m => m.Expected[at]), o.Ms), o);
            }
        }

        return null;
    }

    /// <summary>
    /// The members of a pack of <paramref name="count"/> trees at the snapshot's width number <paramref name="widthIndex"/>:
    /// the device's pick (it is the stream whose turn it is) and the others that expect the most tokens at that width, in
    /// the snapshot's order on a tie; sessions without room for the width are left out. Null when the pick has no room or
    /// too few others do.
    /// </summary>
    public static List<BudgetSession>? Members(WidthBudgetSnapshot snapshot, int widthIndex, int count)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        if (snapshot.Sessions.Length == 0 || snapshot.Sessions[0].Expected[widthIndex] <= 0 || count < 1)
        {
            return null;
        }

        var others = snapshot.Sessions.Skip(1)
            .Select((s, i) => (s, i))
            .Where(t => t.s.Expected[widthIndex] > 0)
            .OrderByDescending(t => t.s.Expected[widthIndex])
            .ThenBy(t => t.i)
            .Take(count - 1)
            .Select(t => t.s)
            .ToList();
        return others.Count == count - 1 ? [snapshot.Sessions[0], .. others] : null;
    }
}
