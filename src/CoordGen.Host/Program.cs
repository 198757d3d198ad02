using System.CommandLine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Host;
using CoordGen.Host.Commands;

var root = new RootCommand("coordgen: fast on-device generation for context-grounded tasks (retrieval speculative decoding over static-shape ONNX graphs).")
{
    GenerateCommand.Create(),
    ModelCommands.Create(),
    BenchCommands.Create(),
};

try
{
    return await root.Parse(args).InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception ex) when (ex is ModelLoadException or PromptTooLongException or ArgumentException or FileNotFoundException or InvalidOperationException)
{
    return ConsoleUi.Fail(ex.Message);
}
catch (OperationCanceledException)
{
    return ConsoleUi.Fail("cancelled.");
}
