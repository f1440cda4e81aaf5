using System.Collections;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text.Json;
using ActorVmm.Devices;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Akka.Actor;
using Akka.Serialization;
using Xunit.Abstractions;

namespace ActorVmm.Host.Tests;

/// <summary>
/// Every message of every actor protocol must be able to cross a network: a sealed, immutable
/// record of plain data (no handles, pointers, spans, delegates, guest memory or vcpus), and it
/// must survive a round trip through the serializer the cluster uses (Hyperion, restricted to the
/// project's types by <see cref="ActorVmm.Host.Control.MessageTypeFilter"/>).
/// </summary>
public sealed class LocationTransparencyTests(ITestOutputHelper output) : Akka.TestKit.Xunit2.TestKit(Config, output)
{
    private const string Config = """
        akka.actor {
          serializers.hyperion = "ActorVmm.Host.Control.LazyHyperionSerializer, actorvmm"
          serialization-bindings { "System.Object" = hyperion }
        }
        """;

    /// <summary>Types the protocols declare but never send (documented as local wiring).</summary>
    private static readonly HashSet<string> NotMessages = [typeof(VcpuProtocol.Wiring).FullName!, typeof(ActorVmm.Lapic.VlapicProtocol.Wiring).FullName!];

    private static readonly Type[] Markers =
    [
        typeof(VcpuProtocol.IVcpuMessage), typeof(DeviceProtocol.IDeviceMessage),
        typeof(VmspaceProtocol.IVmspaceMessage), typeof(SwapperProtocol.ISwapperMessage), typeof(VmProtocol.IVmMessage), typeof(ActorVmm.Lapic.VlapicProtocol.IVlapicMessage),
        typeof(ActorVmm.Host.Control.ControlProtocol.IControlMessage), typeof(ActorVmm.Host.Control.TraceProtocol.ITraceMessage),
        typeof(FaultProtocol.IFaultMessage),
    ];

    /// <summary>Messages without a protocol marker: IPIs to the APIC router, interrupt messages from the IOAPIC,
    /// and the device state records a <see cref="DeviceProtocol.StateReply"/> carries (as an object).</summary>
    private static readonly Type[] Unmarked = [typeof(ActorVmm.Lapic.Ipi), typeof(ApicMessage), .. DeviceStateCodec.RecordTypes];

    private static readonly Assembly[] Assemblies =
    [
        typeof(VcpuProtocol).Assembly, typeof(DeviceProtocol).Assembly, typeof(VmspaceProtocol).Assembly, typeof(VmProtocol).Assembly,
        typeof(ActorVmm.Lapic.VlapicProtocol).Assembly,
    ];

    /// <summary>Types whose values may appear inside a message as they are.</summary>
    private static readonly Type[] Forbidden =
    [
        typeof(IntPtr), typeof(UIntPtr), typeof(Delegate), typeof(IGuestMemory), typeof(IVcpu), typeof(Stream),
        typeof(SafeHandle), typeof(Span<>), typeof(ReadOnlySpan<>), typeof(Memory<>), typeof(ReadOnlyMemory<>),
    ];

    [Fact]
    public void The_discovery_covers_the_four_protocol_assemblies()
    {
        Assert.Equal(
            ["ActorVmm.Actors.Devices", "ActorVmm.Actors.Lapic", "ActorVmm.Actors.Memory", "ActorVmm.Actors.Vcpu", "actorvmm"],
            Assemblies.Select(a => a.GetName().Name!).Order());
        var types = MessageTypes();
        foreach (var t in types) output.WriteLine(t.FullName);
        Assert.True(types.Count > 30, $"only {types.Count} message types found: the discovery is broken");
        foreach (var marker in Markers) Assert.Contains(types, t => marker.IsAssignableFrom(t));
        // Records carried inside messages are covered too.
        foreach (var nested in new[] { typeof(RegisterState), typeof(SpecialRegisterState), typeof(SegmentState), typeof(TableState),
                     typeof(VmspaceProtocol.Segment), typeof(VmProtocol.Outcome), typeof(FaultProtocol.Crash), typeof(FaultProtocol.Stall),
                     typeof(FaultProtocol.FailNestedPageFaults), typeof(ActorVmm.Lapic.Ipi), typeof(ApicMessage) })
            Assert.Contains(nested, types);
        Assert.DoesNotContain(typeof(VcpuProtocol.Wiring), types);
    }

    /// <summary>Every type implementing a protocol marker, and every type of ours carried inside one.</summary>
    private static IReadOnlyList<Type> MessageTypes()
    {
        var found = new HashSet<Type>();
        var pending = new Queue<Type>(Assemblies
            .SelectMany(a => a.GetTypes())
            .Where(t => !t.IsInterface && Markers.Any(m => m.IsAssignableFrom(t)))
            .Concat(Unmarked));
        while (pending.TryDequeue(out var type))
        {
            if (NotMessages.Contains(type.FullName!) || !found.Add(type)) continue;
            foreach (var p in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
                foreach (var t in Constituents(p.PropertyType))
                    if (!t.IsArray && !t.IsEnum && !t.IsPrimitive && t.Assembly.GetName().Name!.StartsWith("ActorVmm", StringComparison.OrdinalIgnoreCase))
                        pending.Enqueue(t); // arrays are judged by their element type (a constituent too)
        }
        return found.OrderBy(t => t.FullName, StringComparer.Ordinal).ToArray();
    }

    /// <summary>A type and, recursively, its element type, generic arguments and Nullable underlying type.</summary>
    private static IEnumerable<Type> Constituents(Type type)
    {
        yield return type;
        if (type.HasElementType)
            foreach (var t in Constituents(type.GetElementType()!)) yield return t;
        if (type.IsGenericType)
            foreach (var arg in type.GetGenericArguments())
                foreach (var t in Constituents(arg)) yield return t;
    }

    private static bool IsForbidden(Type type) =>
        type.IsPointer || type.IsByRef || type.IsByRefLike ||
        Forbidden.Any(f => f.IsGenericTypeDefinition
            ? type.IsGenericType && type.GetGenericTypeDefinition() == f
            : f.IsAssignableFrom(type));

    [Fact]
    public void Every_message_is_a_sealed_immutable_record_of_plain_data()
    {
        var problems = new List<string>();
        foreach (var type in MessageTypes())
        {
            var name = type.FullName;
            if (!type.IsSealed) problems.Add($"{name} is not sealed");
            var isRecord = type.GetProperty("EqualityContract", BindingFlags.NonPublic | BindingFlags.Instance) is not null &&
                           type.GetMethod("<Clone>$", BindingFlags.Public | BindingFlags.Instance) is not null;
            if (!isRecord) problems.Add($"{name} is not a record");
            if (type.IsValueType) problems.Add($"{name} is a struct, not a record class");

            foreach (var p in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
            {
                var setter = p.SetMethod;
                if (setter is { IsPublic: true } &&
                    !setter.ReturnParameter.GetRequiredCustomModifiers().Contains(typeof(IsExternalInit)))
                    problems.Add($"{name}.{p.Name} has a public setter that is not init-only");
            }

            const BindingFlags all = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance;
            foreach (var f in type.GetFields(all))
            {
                if (Constituents(f.FieldType).FirstOrDefault(IsForbidden) is { } bad)
                    problems.Add($"{name} has field {f.Name} of type {f.FieldType} (contains {bad})");
                if (!f.IsInitOnly) problems.Add($"{name} has a mutable field {f.Name}");
            }
            foreach (var p in type.GetProperties(all).Where(p => p.Name != "EqualityContract"))
                if (Constituents(p.PropertyType).FirstOrDefault(IsForbidden) is { } bad)
                    problems.Add($"{name} has property {p.Name} of type {p.PropertyType} (contains {bad})");
        }
        Assert.True(problems.Count == 0, string.Join('\n', problems));
    }

    [Fact]
    public void Every_message_round_trips_through_hyperion()
    {
        var probe = CreateTestProbe("neighbour");
        var problems = new List<string>();
        var count = 0;
        foreach (var type in MessageTypes())
        {
            object original;
            try { original = Sample(type, probe.Ref, 1); }
            catch (NotSupportedException e)
            {
                problems.Add($"{type.FullName}: {e.Message}");
                continue;
            }
            try
            {
                var serializer = Sys.Serialization.FindSerializerFor(original);
                Assert.IsType<ActorVmm.Host.Control.LazyHyperionSerializer>(serializer);
                var bytes = serializer.ToBinary(original);
                var copy = serializer.FromBinary(bytes, type);
                Assert.IsType(type, copy);
                Assert.NotSame(original, copy);
                var before = Json(original);
                var after = Json(copy);
                if (before != after) problems.Add($"{type.FullName}: {before} came back as {after}");
                count++;
            }
            catch (Exception e) when (e is not Xunit.Sdk.XunitException)
            {
                problems.Add($"{type.FullName}: {e.GetType().Name}: {e.Message}");
            }
        }
        Assert.True(problems.Count == 0, string.Join('\n', problems));
        Assert.True(count > 30, $"only {count} messages round-tripped");
    }

    [Fact]
    public void An_actor_reference_inside_a_message_round_trips_to_the_same_actor()
    {
        var probe = CreateTestProbe("target");
        var message = new ActorVmm.Host.Control.ControlProtocol.Register("vm", probe.Ref, ActorRefs.Nobody);
        var serializer = Sys.Serialization.FindSerializerFor(message);
        var copy = (ActorVmm.Host.Control.ControlProtocol.Register)serializer.FromBinary(serializer.ToBinary(message), typeof(object));
        Assert.Equal(probe.Ref, copy.Actor);
        copy.Actor.Tell("ping");
        probe.ExpectMsg("ping");
    }

    [Fact]
    public void The_check_itself_rejects_a_non_serializable_message()
    {
        // A guard against a vacuous check: a message carrying guest memory or a delegate is caught.
        Assert.Contains(Constituents(typeof(Func<int>)), IsForbidden);
        Assert.Contains(Constituents(typeof(IReadOnlyList<IGuestMemory>)), IsForbidden);
        Assert.Contains(Constituents(typeof(GuestMemoryMap)), IsForbidden);
        Assert.Contains(Constituents(typeof(nint)), IsForbidden);
        Assert.Contains(Constituents(typeof(MemoryStream)), IsForbidden);
        Assert.DoesNotContain(Constituents(typeof(byte[])), IsForbidden);
        Assert.DoesNotContain(Constituents(typeof(IReadOnlyList<VmspaceProtocol.Segment>)), IsForbidden);
        Assert.Throws<NotSupportedException>(() => Sample(typeof(VcpuProtocol.Wiring), ActorRefs.Nobody, 1));
    }

    private static string Json(object value) => JsonSerializer.Serialize(value, value.GetType(), TraceRecorder.JsonOptions);

    /// <summary>
    /// A value of <paramref name="type"/> with every field set to something other than its default,
    /// built through the record's primary constructor. Unknown parameter types are an error, so a
    /// new message with a new kind of field makes this test fail until it is covered here.
    /// </summary>
    private static object Sample(Type type, IActorRef actor, int seed)
    {
        if (Nullable.GetUnderlyingType(type) is { } underlying) return Sample(underlying, actor, seed);
        if (type == typeof(bool)) return true;
        if (type == typeof(byte)) return (byte)(0x80 + seed);
        if (type == typeof(sbyte)) return (sbyte)(-seed);
        if (type == typeof(short)) return (short)(-300 - seed);
        if (type == typeof(ushort)) return (ushort)(0xF000 + seed);
        if (type == typeof(int)) return 100_000 + seed;
        if (type == typeof(uint)) return 0xC000_0000u + (uint)seed;
        if (type == typeof(long)) return -(1L << 40) - seed;
        if (type == typeof(ulong)) return 0xFEDC_BA98_7654_3210UL + (ulong)seed;
        if (type == typeof(double)) return 2.5 + seed;
        if (type == typeof(string)) return $"sample-{seed}";
        if (type == typeof(TimeSpan)) return TimeSpan.FromTicks(123_456_789 + seed);
        // The one object-typed field (StateReply.State) holds a device state record: one with nested records.
        if (type == typeof(object)) return Sample(typeof(PitState), actor, seed);
        if (type.IsGenericType && type.GetGenericTypeDefinition() == typeof(System.Collections.Immutable.ImmutableArray<>))
        {
            var element = type.GetGenericArguments()[0];
            var array = (Array)Sample(element.MakeArrayType(), actor, seed);
            return typeof(System.Collections.Immutable.ImmutableArray).GetMethods()
                .Single(m => m.Name == "Create" && m.GetParameters() is [{ ParameterType.IsArray: true }])
                .MakeGenericMethod(element).Invoke(null, [array])!;
        }
        if (type.IsEnum)
        {
            var values = Enum.GetValues(type);
            return values.GetValue(values.Length - 1)!;
        }
        if (typeof(IActorRef).IsAssignableFrom(type)) return actor;
        if (type.IsArray)
        {
            var element = type.GetElementType()!;
            var array = Array.CreateInstance(element, 3);
            for (var i = 0; i < 3; i++) array.SetValue(Sample(element, actor, seed + i + 1), i);
            return array;
        }
        if (type.IsGenericType && type.IsInterface && type.GetGenericArguments().Length == 1 &&
            type.IsAssignableFrom(type.GetGenericArguments()[0].MakeArrayType()))
            return Sample(type.GetGenericArguments()[0].MakeArrayType(), actor, seed);

        if (type.IsClass && !type.IsAbstract && !typeof(Delegate).IsAssignableFrom(type) &&
            type.Assembly.GetName().Name!.StartsWith("ActorVmm", StringComparison.OrdinalIgnoreCase))
        {
            var ctor = type.GetConstructors(BindingFlags.Public | BindingFlags.Instance)
                .Where(c => !(c.GetParameters() is [var only] && only.ParameterType == type))
                .MaxBy(c => c.GetParameters().Length)
                ?? throw new NotSupportedException($"{type} has no public constructor");
            var parameters = ctor.GetParameters();
            var args = new object?[parameters.Length];
            for (var i = 0; i < parameters.Length; i++)
            {
                if (IsForbidden(parameters[i].ParameterType) || Constituents(parameters[i].ParameterType).Any(IsForbidden))
                    throw new NotSupportedException($"{type} parameter {parameters[i].Name} is a {parameters[i].ParameterType}");
                args[i] = Sample(parameters[i].ParameterType, actor, seed + i + 1);
            }
            var value = ctor.Invoke(args);
            // A record built from init-only properties alone (no constructor parameters): fill them.
            if (parameters.Length == 0)
                foreach (var (p, i) in type.GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.SetMethod is { IsPublic: true })
                             .Select((p, i) => (p, i)))
                    p.SetValue(value, Sample(p.PropertyType, actor, seed + i + 1));
            return value;
        }
        throw new NotSupportedException($"no sample value for a {type}: teach {nameof(Sample)} this type");
    }
}
