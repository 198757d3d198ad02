using System.Runtime.InteropServices;
using CoordGen.Engine.Onnx.Proto;
using Google.Protobuf;

namespace CoordGen.Engine.Onnx;

/// <summary>Small helper for writing ONNX graphs: unique names, nodes, constants, typed inputs and outputs.</summary>
internal sealed class GraphBuilder(string name)
{
    /// <summary>Domain of ONNX Runtime's contrib operators (MatMulNBits).</summary>
    public const string MicrosoftDomain = "com.microsoft";

    private readonly GraphProto _graph = new() { Name = name };
    private int _counter;
    private bool _usesMicrosoftDomain;

    /// <summary>A node of ONNX Runtime's com.microsoft contrib domain.</summary>
    public string ContribNode(string op, IEnumerable<string> inputs, params AttributeProto[] attrs)
    {
        string o = Fresh(op.ToLowerInvariant());
        ContribNodeOutputs(op, inputs, [o], attrs);
        return o;
    }

    /// <summary>A node of the com.microsoft contrib domain with named outputs (several, or one a graph output names).</summary>
    public void ContribNodeOutputs(string op, IEnumerable<string> inputs, IEnumerable<string> outputs, params AttributeProto[] attrs)
    {
        AddNode(op, inputs, outputs, attrs).Domain = MicrosoftDomain;
        _usesMicrosoftDomain = true;
    }

    public string Fresh(string hint) => $"{hint}_{_counter++}";

    public string Node(string op, IEnumerable<string> inputs, string? output = null, params AttributeProto[] attrs)
    {
        string o = output ?? Fresh(op.ToLowerInvariant());
        AddNode(op, inputs, [o], attrs);
        return o;
    }

    public string[] NodeMulti(string op, IEnumerable<string> inputs, int outputs, params AttributeProto[] attrs)
    {
        var outs = Enumerable.Range(0, outputs).Select(_ => Fresh(op.ToLowerInvariant())).ToArray();
        AddNode(op, inputs, outs, attrs);
        return outs;
    }

    private NodeProto AddNode(string op, IEnumerable<string> inputs, IEnumerable<string> outputs, AttributeProto[] attrs)
    {
        var n = new NodeProto { OpType = op, Name = Fresh("n_" + op) };
        n.Input.AddRange(inputs);
        n.Output.AddRange(outputs);
        n.Attribute.AddRange(attrs);
        _graph.Node.Add(n);
        return n;
    }

    public static AttributeProto Int(string name, long v) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = v };

    public static AttributeProto Float(string name, float v) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = v };

    public static AttributeProto Ints(string name, params long[] v)
    {
        var a = new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints };
        a.Ints.AddRange(v);
        return a;
    }

    public string ConstInt32(int[] values, long[]? dims = null, string? hint = null) =>
        Const<int>(values, dims ?? [values.Length], TensorProto.Types.DataType.Int32, hint ?? "c_i32");

    public string ConstInt64(long[] values, long[]? dims = null, string? hint = null) =>
        Const<long>(values, dims ?? [values.Length], TensorProto.Types.DataType.Int64, hint ?? "c_i64");

    public string ConstFloat(float[] values, long[] dims, string? hint = null) =>
        Const<float>(values, dims, TensorProto.Types.DataType.Float, hint ?? "c_f32");

    private string Const<T>(T[] values, long[] dims, TensorProto.Types.DataType type, string hint)
        where T : unmanaged
    {
        var t = new TensorProto { Name = Fresh(hint), DataType = (int)type };
        t.Dims.AddRange(dims);
        t.RawData = ByteString.CopyFrom(MemoryMarshal.AsBytes(values.AsSpan()));
        _graph.Initializer.Add(t);
        return t.Name;
    }

    /// <summary>
    /// Declares a weight whose data lives outside the graph. The session is given the tensor through
    /// SessionOptions.AddInitializer, so every graph width shares one copy (see OrtModelRuntime).
    /// </summary>
    public string SharedWeight(string weightName, long[] dims, TensorProto.Types.DataType type = TensorProto.Types.DataType.Float)
    {
        var t = new TensorProto
        {
            Name = weightName,
            DataType = (int)type,
            DataLocation = TensorProto.Types.DataLocation.External,
        };
        t.Dims.AddRange(dims);
        long bytes = dims.Aggregate(type == TensorProto.Types.DataType.Uint8 ? 1L : 4L, (a, b) => a * b);
        t.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = LlamaGraphCompiler.SharedWeightsFile });
        t.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = "0" });
        t.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = bytes.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        _graph.Initializer.Add(t);
        return weightName;
    }

    public void Input(string inputName, TensorProto.Types.DataType type, params long[] dims) => _graph.Input.Add(ValueInfo(inputName, type, dims));

    /// <summary>An input whose dims are numbers or symbolic names (strings), for graphs whose lengths vary per run.</summary>
    public void InputDynamic(string inputName, TensorProto.Types.DataType type, params object[] dims) => _graph.Input.Add(DynamicValueInfo(inputName, type, dims));

    public void OutputDynamic(string outputName, TensorProto.Types.DataType type, params object[] dims) => _graph.Output.Add(DynamicValueInfo(outputName, type, dims));

    private static ValueInfoProto DynamicValueInfo(string n, TensorProto.Types.DataType type, object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var d in dims)
        {
            shape.Dim.Add(d is string sym
                ? new TensorShapeProto.Types.Dimension { DimParam = sym }
                : new TensorShapeProto.Types.Dimension { DimValue = Convert.ToInt64(d, System.Globalization.CultureInfo.InvariantCulture) });
        }

        return new ValueInfoProto
        {
            Name = n,
            Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } },
        };
    }

    /// <summary>A float weight stored in <paramref name="file"/> (beside the graph) at <paramref name="offset"/>: a self-contained model folder.</summary>
    public string FileWeight(string weightName, long[] dims, string file, long offset)
    {
        var t = new TensorProto
        {
            Name = weightName,
            DataType = (int)TensorProto.Types.DataType.Float,
            DataLocation = TensorProto.Types.DataLocation.External,
        };
        t.Dims.AddRange(dims);
        long bytes = dims.Aggregate(4L, (a, b) => a * b);
        t.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = file });
        t.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = offset.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        t.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = bytes.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        _graph.Initializer.Add(t);
        return weightName;
    }

    public void Output(string outputName, TensorProto.Types.DataType type, params long[] dims) => _graph.Output.Add(ValueInfo(outputName, type, dims));

    private static ValueInfoProto ValueInfo(string n, TensorProto.Types.DataType type, long[] dims) => DynamicValueInfo(n, type, [.. dims.Cast<object>()]);

    public ModelProto Build(int opset, IDictionary<string, string> metadata)
    {
        ElideOutputIdentities();
        var m = new ModelProto
        {
            IrVersion = 8,
            ProducerName = "coordgen",
            ProducerVersion = "0.1",
            Graph = _graph,
        };
        m.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = opset });
        if (_usesMicrosoftDomain)
        {
            m.OpsetImport.Add(new OperatorSetIdProto { Domain = MicrosoftDomain, Version = 1 });
        }

        foreach (var kv in metadata)
        {
            m.MetadataProps.Add(new StringStringEntryProto { Key = kv.Key, Value = kv.Value });
        }

        return m;
    }

    // An Identity that only gives a value the graph computes the name of a graph output costs a node per run (60 a step
    // on the 135M twin: each layer's present key and value): the node that computes the value writes the output's name
    // instead, and its readers read that. Values that are graph inputs, initializers or outputs already keep their Identity.
    private void ElideOutputIdentities()
    {
        var outputs = _graph.Output.Select(o => o.Name).ToHashSet();
        var produced = _graph.Node.SelectMany(n => n.Output).ToHashSet();
        foreach (var identity in _graph.Node.Where(n => n.OpType == "Identity" && n.Domain.Length == 0).ToList())
        {
            string from = identity.Input[0], to = identity.Output[0];
            if (!outputs.Contains(to) || outputs.Contains(from) || !produced.Contains(from))
            {
                continue;
            }

            _graph.Node.Remove(identity);
            foreach (var n in _graph.Node)
            {
                Rename(n.Input, from, to);
                Rename(n.Output, from, to);
            }

            produced.Remove(from);
        }

        static void Rename(Google.Protobuf.Collections.RepeatedField<string> names, string from, string to)
        {
            for (int i = 0; i < names.Count; i++)
            {
                if (names[i] == from)
                {
                    names[i] = to;
                }
            }
        }
    }
}
