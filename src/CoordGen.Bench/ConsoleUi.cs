using CoordGen.Engine.Model;
using Spectre.Console;

namespace CoordGen.Host;

/// <summary>Progress bars and status lines on stderr, so stdout carries only generated text and reports.</summary>
internal static class ConsoleUi
{
    public static readonly IAnsiConsole Err = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });

    public static ModelBundle LoadModel(string dir)
    {
        ModelBundle? bundle = null;
        Err.Progress()
            .AutoClear(true)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask($"loading {Path.GetFileName(Path.GetFullPath(dir).TrimEnd('/'))}", maxValue: 1.0);
                bundle = ModelBundle.Load(dir, new Progress<double>(p => task.Value = p));
                task.Value = 1.0;
            });
        return bundle!;
    }

    public static T Status<T>(string what, Func<T> work)
    {
        T result = default!;
        Err.Status().Start(what, _ => result = work());
        return result;
    }

    public static int Fail(string message)
    {
        // Plain text, unwrapped: error lines are read by people and by scripts alike.
        Console.Error.WriteLine($"error: {message}");
        return 1;
    }
}
