using System.CommandLine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Host.Commands;

namespace CoordGen.Host;

/// <summary>The <c>coordgen</c> command tree and its error handling: known failures print one line saying what to do.</summary>
public static class Cli
{
    public static RootCommand BuildRoot() => new("coordgen: fast on-device generation for context-grounded tasks (retrieval speculative decoding over static-shape ONNX graphs).")
    {
        GenerateCommand.Create(),
        ModelCommands.Create(),
        BenchCommands.Create(),
        Serving.ServeCommand.Create(),
    };

    public static async Task<int> RunAsync(string[] args)
    {
        try
        {
            return await BuildRoot().Parse(args).InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception ex) when (ex is ModelLoadException or PromptTooLongException or ArgumentException or FileNotFoundException or InvalidOperationException or InvalidDataException)
        {
            return ConsoleUi.Fail(ex.Message);
        }
        catch (OperationCanceledException)
        {
            return ConsoleUi.Fail("cancelled.");
        }
    }
}
