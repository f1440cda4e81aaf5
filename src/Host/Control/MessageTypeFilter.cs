using System.Reflection;
using Hyperion;
using Serilog;

namespace ActorVmm.Host.Control;

/// <summary>
/// The types a message from another node or a `ctl` client may contain: ActorVmm's own (its
/// assemblies), plain data from the base library (primitives, strings, arrays, the generic and
/// immutable collections, tuples, nullable values) and the surrogates Akka sends actor references
/// and paths as. Hyperion names each type in its stream and asks this filter before it loads one
/// (<see cref="ITypeFilter"/>); any other type (a delegate, a stream, a process, a type of another
/// program) fails the message's deserialization: Akka drops the message and this filter logs the
/// type. Nothing outside the list is loaded or constructed.
/// </summary>
public sealed class MessageTypeFilter : ITypeFilter
{
    public static readonly MessageTypeFilter Instance = new();

    private static readonly HashSet<string> BaseLibraryTypes = new(StringComparer.Ordinal)
    {
        "System.Object", "System.Boolean", "System.Char", "System.String",
        "System.Byte", "System.SByte", "System.Int16", "System.UInt16", "System.Int32", "System.UInt32",
        "System.Int64", "System.UInt64", "System.Int128", "System.UInt128", "System.IntPtr", "System.UIntPtr",
        "System.Single", "System.Double", "System.Decimal", "System.Half",
        "System.Guid", "System.DateTime", "System.DateTimeOffset", "System.TimeSpan", "System.DateOnly", "System.TimeOnly",
        "System.Nullable`1", "System.Version",
        "System.Tuple`1", "System.Tuple`2", "System.Tuple`3", "System.Tuple`4", "System.Tuple`5", "System.Tuple`6", "System.Tuple`7",
        "System.ValueTuple`1", "System.ValueTuple`2", "System.ValueTuple`3", "System.ValueTuple`4", "System.ValueTuple`5",
        "System.ValueTuple`6", "System.ValueTuple`7",
        "System.Collections.Generic.List`1", "System.Collections.Generic.Dictionary`2", "System.Collections.Generic.HashSet`1",
        "System.Collections.Generic.KeyValuePair`2", "System.Collections.Generic.SortedDictionary`2", "System.Collections.Generic.SortedSet`1",
        "System.Collections.Generic.SortedList`2", "System.Collections.Generic.Queue`1", "System.Collections.Generic.Stack`1",
        "System.Collections.Generic.LinkedList`1",
        // What Dictionary, HashSet and the sorted collections carry as their comparer.
        "System.Collections.Generic.GenericEqualityComparer`1", "System.Collections.Generic.ObjectEqualityComparer`1",
        "System.Collections.Generic.EnumEqualityComparer`1", "System.Collections.Generic.ByteEqualityComparer",
        "System.Collections.Generic.GenericComparer`1", "System.Collections.Generic.ObjectComparer`1",
        "System.OrdinalComparer", "System.OrdinalCaseSensitiveComparer", "System.OrdinalIgnoreCaseComparer",
        "System.Collections.Generic.NonRandomizedStringEqualityComparer", // its OrdinalComparer, OrdinalIgnoreCaseComparer
        "System.Collections.ObjectModel.ReadOnlyCollection`1", "System.Collections.ObjectModel.ReadOnlyDictionary`2",
    };

    /// <summary>Akka's: how an actor reference or path crosses the wire (ISurrogated: ActorRefBase+Surrogate,
    /// ActorPath+Surrogate, Nobody's). The type resolver sees a nested type's outermost type.</summary>
    private static readonly HashSet<string> AkkaTypes = new(StringComparer.Ordinal)
    {
        "Akka.Actor.ActorRefBase", "Akka.Actor.ActorPath", "Akka.Actor.Address", "Akka.Actor.Nobody",
        "Akka.Actor.IActorRef", // as a collection's element type
    };

    private static readonly HashSet<string> BaseLibraryAssemblies = new(StringComparer.Ordinal)
    {
        "System.Private.CoreLib", "mscorlib", "System.Runtime", "System.Collections", "System.Collections.Immutable",
        "System.Core", "netstandard",
    };

    /// <summary>Whether <paramref name="typeName"/> (Hyperion's assembly-qualified name, generic
    /// arguments included) names only allowed types. Logs what it refuses.</summary>
    public bool IsAllowed(string typeName)
    {
        if (Allowed(typeName)) return true;
        Log.Warning("refused a message from the network: it contains type {Type}, which is not one of ActorVmm's message types", typeName);
        return false;
    }

    /// <summary>The decision without the log.</summary>
    public static bool Allowed(string typeName)
    {
        try
        {
            // Type.GetType parses the name (generic arguments, arrays, nesting) and asks the two
            // resolvers for each assembly and type in it; either answering null makes the whole
            // name unresolved. Only assemblies already loaded are looked at: nothing is loaded.
            // Hyperion writes the base library's assembly as ",%core%" (its version stripped).
            var type = Type.GetType(typeName.Replace(",%core%", "", StringComparison.Ordinal), ResolveAssembly, ResolveType, throwOnError: false);
            return type is not null;
        }
        catch (Exception e) when (e is ArgumentException or TypeLoadException or FileLoadException or BadImageFormatException)
        {
            return false;
        }
    }

    private static Assembly? ResolveAssembly(AssemblyName name)
    {
        var simple = name.Name ?? "";
        if (!IsProjectAssembly(simple) && !BaseLibraryAssemblies.Contains(simple) && simple != "Akka") return null;
        return AppDomain.CurrentDomain.GetAssemblies().FirstOrDefault(a => a.GetName().Name == simple);
    }

    /// <summary>The type resolver: <paramref name="name"/> is a top-level type (Type.GetType finds nested
    /// types in it itself), so the lists name top-level types.</summary>
    private static Type? ResolveType(Assembly? assembly, string name, bool ignoreCase)
    {
        if (assembly is null)
        {
            // A name without an assembly is looked up in the base library.
            return BaseLibraryTypes.Contains(name) || name.StartsWith("System.Collections.Immutable.", StringComparison.Ordinal)
                ? typeof(object).Assembly.GetType(name) ?? typeof(System.Collections.Immutable.ImmutableArray).Assembly.GetType(name)
                : null;
        }
        var simple = assembly.GetName().Name ?? "";
        var allowed = IsProjectAssembly(simple)
                      || (simple == "Akka" && AkkaTypes.Contains(name))
                      || (BaseLibraryAssemblies.Contains(simple)
                          && (BaseLibraryTypes.Contains(name) || name.StartsWith("System.Collections.Immutable.", StringComparison.Ordinal)));
        return allowed ? assembly.GetType(name, throwOnError: false, ignoreCase: false) : null;
    }

    /// <summary>The product's assemblies: the host and its libraries (not tests, not tools).</summary>
    private static bool IsProjectAssembly(string name) =>
        name is "actorvmm" or "ActorVmm.LibVmm" or "ActorVmm.Actors.Devices" or "ActorVmm.Actors.Lapic"
            or "ActorVmm.Actors.Memory" or "ActorVmm.Actors.Vcpu";
}
