using Iced.Intel;

namespace ActorVmm.Host.Guests;

/// <summary>Assembles guest code with Iced at a given address.</summary>
public static class GuestCode
{
    public static byte[] Assemble(Assembler assembler, ulong address)
    {
        using var stream = new MemoryStream();
        assembler.Assemble(new StreamCodeWriter(stream), address);
        return stream.ToArray();
    }
}
